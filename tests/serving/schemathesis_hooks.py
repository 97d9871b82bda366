"""Schemathesis hooks for the conformance run: an upload's `format: binary` is an image here."""

from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


schemathesis.openapi.format("binary", st.integers(0, 2**32 - 1).map(_png))
