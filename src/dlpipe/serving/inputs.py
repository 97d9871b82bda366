"""Request payloads to model inputs, through the model's own `DataPreprocessor` (as in training).

`UploadPolicy` looks at what arrived before any model is involved: image formats and sizes are
read from the headers (no pixel is decoded for an image that will be refused), texts are
measured before tokenizing. `InputDecoder` then turns accepted payloads into model inputs.
Every failure is a 4xx whose message says what was wrong.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dlpipe.config import PreprocessingConfig
from dlpipe.serving.errors import InvalidRequest, PayloadTooLarge

Sample = np.ndarray | dict[str, np.ndarray]


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def loads(raw: bytes | str, what: str = "request body") -> Any:
    """`json.loads` whose every failure is a 400 (NaN/Infinity literals are refused)."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest(f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, int digit limit, ...
        raise InvalidRequest(f"{what} is not valid JSON: {err}") from None


# The pixel budget is checked from each header (UploadPolicy.open_image); Pillow's own warning
# for large images is noise then. Set once: `warnings.catch_warnings` per request is not free.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

INLINE_DECODE_PIXELS = 512 * 512
"""Requests with fewer pixels in all are decoded on the event loop (a thread hop costs more than
decoding a thumbnail); larger ones go to the decode pool so the loop keeps answering."""


class UploadPolicy:
    """What the service accepts, checked before decoding: image formats and pixel counts (from
    the image headers), text lengths."""

    def __init__(self, formats: list[str], max_pixels: int, max_text_chars: int) -> None:
        self.formats = [f.upper() for f in formats]
        self.max_pixels = max_pixels
        self.max_text_chars = max_text_chars

    def open_image(self, data: bytes, field: str) -> Any:
        """The image with only its header read (a PIL image, decoded later, once); 400 for
        another format or unreadable bytes, 413 beyond the pixel budget."""
        from dlpipe.data.preprocessing import ImageTooLargeError, open_image

        try:
            # Only the formats we accept are even tried: no other decoder sees the bytes.
            image = open_image(data, self.formats)
        except ImageTooLargeError:
            raise PayloadTooLarge(f"{field}: image has more pixels than decoders allow") from None
        except ValueError:  # InvalidInputError: not one of the formats, or an unreadable header
            head = bytes(data[:8]).hex(" ") if isinstance(data, bytes) else ""
            raise InvalidRequest(
                f"{field}: not a readable {' or '.join(self.formats)} image ({len(data)} bytes, "
                f"first bytes {head}); accepted formats: {', '.join(self.formats)}"
            ) from None
        width, height = image.size
        pixels = width * height
        if pixels > self.max_pixels:
            raise PayloadTooLarge(
                f"{field}: image is {width}x{height} ({pixels} pixels), more than the "
                f"{self.max_pixels} pixels accepted"
            )
        return image

    def check_text(self, text: Any, field: str) -> None:
        if isinstance(text, str) and len(text) > self.max_text_chars:
            raise PayloadTooLarge(
                f"{field}: text of {len(text)} characters exceeds the limit of "
                f"{self.max_text_chars}"
            )


class InputDecoder:
    """Turns uploaded image bytes or text into one model input sample (no batch dimension)."""

    def __init__(
        self,
        preprocessing: PreprocessingConfig,
        *,
        resize_inputs: bool = True,
        tokenizer_file: Path | None = None,
    ) -> None:
        from dlpipe.data import DataPreprocessor

        self.config = preprocessing
        self.task = preprocessing.task_type
        self.resize_inputs = resize_inputs
        # A package's own tokenizer.json, if it has one (then no tokenizer package is needed).
        self._pre: Any = DataPreprocessor(preprocessing, tokenizer_file=tokenizer_file)

    def image(self, data: Any, field: str = "file") -> np.ndarray:
        """Decode and preprocess one uploaded image (PNG/JPEG bytes, or a PIL image whose header
        `UploadPolicy.open_image` read) to float32 C×H×W."""
        from dlpipe.data import InvalidInputError

        if self.task != "image_classification":
            raise InvalidRequest(
                f'this model classifies text; send JSON {{"text": ...}} instead of {field!r}'
            )
        try:
            image = self._decode(data, field)
            if not self.resize_inputs and self.config.image_size is not None:
                h, w = self.config.image_size
                if (image.height, image.width) != (h, w):
                    raise InvalidRequest(
                        f"{field}: image is {image.width}x{image.height} (WxH); this model takes "
                        f"exactly {w}x{h} and resizing is disabled"
                    )
            batch = self._pre.preprocess_inference_batch([image])
        except InvalidInputError as err:
            raise InvalidRequest(f"{field}: {err}") from None
        return np.asarray(batch[0], dtype=np.float32)

    def _decode(self, data: Any, field: str) -> Any:
        from dlpipe.data import InvalidInputError
        from dlpipe.data.preprocessing import load_image

        try:
            if isinstance(data, bytes | bytearray | memoryview):
                return self._pre.decode_image(data)
            return load_image(data)  # opened by the upload policy: decode its pixels once
        except InvalidInputError:
            raise
        except Exception as err:  # PIL raises OSError, EOFError, struct.error... on bad bytes
            raise InvalidRequest(
                f"{field}: not a readable image ({type(err).__name__}: {err})"
            ) from None

    def text(self, text: Any, field: str = "text") -> dict[str, np.ndarray]:
        """Tokenize one text to `input_ids` and `attention_mask` (int64, 1-D)."""
        from dlpipe.data import InvalidInputError

        if self.task != "text_classification":
            raise InvalidRequest(
                f"this model classifies images; upload a multipart file instead of {field!r}"
            )
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest(f"{field} must be a non-empty string, got {type(text).__name__}")
        try:
            batch = self._pre.preprocess_inference_batch([text])
        except InvalidInputError as err:
            raise InvalidRequest(f"{field}: {err}") from None
        return {k: np.asarray(v[0], dtype=np.int64) for k, v in batch.items()}

    def tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray, field: str) -> None:
        """Check already-tokenized inputs against this model's preprocessing (400 when off):
        N x L int arrays, 1 <= L <= max_sequence_length, ids within the vocabulary, mask 0/1."""
        if self.task != "text_classification":
            raise InvalidRequest(f"{field}: this model classifies images, not token ids")
        longest = self.config.max_sequence_length or 0
        for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if array.ndim != 2 or not 1 <= array.shape[1] <= longest:
                raise InvalidRequest(
                    f"{field}: {name} must be N x L with 1 <= L <= {longest} (this model's "
                    f"max_sequence_length), got shape {list(array.shape)}"
                )
            if array.dtype.kind not in "iu":
                raise InvalidRequest(f"{field}: {name} must be integers, got {array.dtype}")
        if input_ids.shape != attention_mask.shape:
            raise InvalidRequest(
                f"{field}: input_ids {list(input_ids.shape)} and attention_mask "
                f"{list(attention_mask.shape)} differ in shape"
            )
        vocab = self._pre.vocab_size
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise InvalidRequest(f"{field}: input_ids must lie in [0, {vocab - 1}]")
        if attention_mask.size and not np.isin(attention_mask, (0, 1)).all():
            raise InvalidRequest(f"{field}: attention_mask values must be 0 or 1")


def softmax_top_k(
    logits: np.ndarray, class_names: list[str] | None, k: int
) -> list[dict[str, Any]]:
    """Top-k classes of one logits row, each with its label and probability."""
    z = logits.astype(np.float64) - float(np.max(logits))
    probs = np.exp(z)
    probs /= probs.sum()
    k = min(k, probs.shape[0])
    # Stable: tied classes (INT8 logits sit on a grid, so exact ties happen) rank by index, as
    # argmax does in training and optimize; the default sort picked either of them.
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        {
            "label": class_names[i] if class_names and i < len(class_names) else str(int(i)),
            "class_index": int(i),
            "probability": round(float(probs[i]), 6),
        }
        for i in order
    ]
