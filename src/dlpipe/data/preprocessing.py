"""`DataPreprocessor`: the one place raw samples become model inputs, in training and serving.

    pre = DataPreprocessor(cfg.preprocessing)
    x = pre.preprocess_inference(png_bytes)          # float32 C×H×W tensor
    batch = pre.preprocess_inference_batch(uploads)  # float32 N×C×H×W array for ONNX Runtime

Images go decode → convert to `channels` → resize to `image_size` (uint8, H×W×C) → [augment] →
normalize. Augmentation (random horizontal flip + padded random crop) works on the uint8 image, so
with augmentation off, or its random draw fixed to identity, training and inference run exactly the
same code and give bit-identical outputs (design Property 20). Normalization is a per-channel
lookup table over the 256 possible byte values: exact, and the same result for one image or many.

Text goes through a `tokenizers` tokenizer.json (no transformers, no torch: serving imports this
module); torch is imported only by the methods that return tensors, for training.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from dlpipe.config import PreprocessingConfig

if TYPE_CHECKING:  # serving imports this module without torch installed
    import torch
    from tokenizers import Tokenizer

# PIL mode for each channel count; everything else is converted to one of these.
_MODE_FOR_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# 8-bit modes Pillow converts faithfully; 16-bit, 32-bit int and float images are refused.
_SUPPORTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
RESIZE_INTERPOLATION = Image.Resampling.BILINEAR
# The `tokenizers` file a text model tokenizes with; a model package carries its own copy.
TOKENIZER_FILE = "tokenizer.json"


class InvalidInputError(ValueError):
    """Bad user input (not an image, wrong shape, empty text...); serving answers HTTP 400."""


class ImageTooLargeError(InvalidInputError):
    """An image header declares more pixels than Pillow's decompression-bomb limit (HTTP 413)."""


@dataclass(frozen=True)
class AugmentParams:
    """One random draw of image augmentation for a batch of N images."""

    flip: np.ndarray  # (N,) bool: mirror horizontally
    shift: np.ndarray  # (N, 2) int: top-left (y, x) of the crop window in the padded image

    @classmethod
    def identity(cls, n: int, pad: int) -> AugmentParams:
        """The draw that leaves every image unchanged."""
        return cls(np.zeros(n, dtype=bool), np.full((n, 2), pad, dtype=np.int64))


def resolve_tokenizer_file(name: str) -> Path:
    """The tokenizer.json for a `tokenizer_name`: `minilm`, a directory holding one, or the file."""
    if name == "minilm":
        from dlpipe.models.pretrained import minilm_dir

        path = minilm_dir() / TOKENIZER_FILE
    else:
        given = Path(name)
        if not given.exists():
            raise ValueError(
                f"tokenizer_name {name!r} is neither 'minilm' nor an existing local directory"
            )
        path = given / TOKENIZER_FILE if given.is_dir() else given
    if not path.is_file():
        raise ValueError(f"no {TOKENIZER_FILE} at {path} (tokenizer_name {name!r})")
    return path


def _special_token(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _padding_settings(file: Path, tokenizer: Tokenizer) -> tuple[str, str, str]:
    """(pad token, padding side, truncation side), resolved as transformers resolves them.

    tokenizer_config.json / special_tokens_map.json beside the file win over the file's own
    padding and truncation sections (transformers' order); a package's copy carries both.
    """
    settings: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        side_file = file.parent / name
        if side_file.is_file():
            try:
                settings.update(json.loads(side_file.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{side_file}: not valid JSON: {err}") from None
    own_padding = tokenizer.padding or {}
    own_truncation = tokenizer.truncation or {}
    pad = _special_token(settings.get("pad_token")) or own_padding.get("pad_token")
    if pad is None:
        raise ValueError(f"{file}: the tokenizer has no padding token, so it cannot pad")
    padding_side = settings.get("padding_side") or own_padding.get("direction", "right")
    truncation_side = settings.get("truncation_side") or own_truncation.get("direction", "right")
    return str(pad), str(padding_side), str(truncation_side)


@lru_cache(maxsize=8)
def _load_tokenizer(file: str, max_length: int) -> tuple[Tokenizer, threading.Lock]:
    """A `tokenizers` tokenizer that truncates and pads every text to `max_length` tokens."""
    from tokenizers import Tokenizer

    path = Path(file)
    try:
        tokenizer = Tokenizer.from_file(file)
    except Exception as err:  # the Rust side raises a bare Exception on malformed files
        raise ValueError(f"{path}: not a tokenizers {TOKENIZER_FILE}: {err}") from None
    special = tokenizer.num_special_tokens_to_add(False)
    if max_length <= special:
        raise ValueError(
            f"max_sequence_length={max_length} is too short: the "
            f"tokenizer adds {special} special tokens; use at least {special + 1}"
        )
    pad_token, padding_side, truncation_side = _padding_settings(path, tokenizer)
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"{path}: padding token {pad_token!r} is not in the vocabulary")
    # Same settings as transformers' padding="max_length", truncation=True (longest_first).
    tokenizer.enable_truncation(max_length, direction=truncation_side)
    tokenizer.enable_padding(
        direction=padding_side, pad_id=pad_id, pad_token=pad_token, length=max_length
    )
    # Encoding while another thread (re)configures would fail ("already borrowed"); the
    # settings are fixed once here, and each cached tokenizer still comes with its own lock.
    return tokenizer, threading.Lock()


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG/JPEG/... bytes fully; raise InvalidInputError saying what was wrong.

    Always a full-resolution decode (no JPEG draft scaling): serving may decode first and
    preprocess the PIL image later, and must get exactly the pixels training got from the file.
    """
    return load_image(open_image(data))


def open_image(data: bytes, formats: list[str] | None = None) -> Image.Image:
    """Read an image's header only (its format and size; no pixel is decoded yet).

    `formats`: the only Pillow formats tried (a server accepting PNG and JPEG never runs another
    decoder on hostile bytes). Raises InvalidInputError saying what was wrong.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInputError(f"expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidInputError("empty upload: the image file has 0 bytes")
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        head = bytes(data[:8]).hex(" ")
        known = f"no {' or '.join(formats)} image" if formats else "no known image format"
        raise InvalidInputError(
            f"not an image: {len(data)} bytes in {known} (first bytes: {head})"
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"image too large: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:  # e.g. a PNG cut inside its header
        raise InvalidInputError(f"corrupt image header: {err}") from None


def load_image(img: Image.Image) -> Image.Image:
    """Decode an opened image's pixels (truncated or corrupt data fails here, not later)."""
    fmt = img.format or "image"
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidInputError(f"truncated or corrupt {fmt} file: {err}") from None
    if img.mode not in _SUPPORTED_MODES:
        raise InvalidInputError(
            f"unsupported {fmt} image mode {img.mode!r}; send an 8-bit grayscale, RGB or RGBA "
            f"image (supported modes: {', '.join(sorted(_SUPPORTED_MODES))})"
        )
    return img


class DataPreprocessor:
    """Transforms for one `PreprocessingConfig`, shared by training and inference."""

    def __init__(self, config: PreprocessingConfig, tokenizer_file: str | Path | None = None):
        """`tokenizer_file`: a tokenizer.json to use instead of `config.tokenizer_name`'s (a
        model package's own copy, so serving needs no tokenizer package installed)."""
        self._apply(config, None if tokenizer_file is None else Path(tokenizer_file))

    def __reduce__(
        self,
    ) -> tuple[type[DataPreprocessor], tuple[PreprocessingConfig, Path | None]]:
        # Pickle the config only (DataLoader workers, Ray): locks and tokenizers are rebuilt.
        return (type(self), (self.config, self.tokenizer_file))

    # -- configuration ---------------------------------------------------------------------

    def _apply(self, config: PreprocessingConfig, tokenizer_file: Path | None) -> None:
        self.config = config
        self.is_text = config.task_type == "text_classification"
        self.tokenizer_file: Path | None = None
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        if self.is_text:
            assert config.tokenizer_name is not None and config.max_sequence_length is not None
            if tokenizer_file is None:
                tokenizer_file = resolve_tokenizer_file(config.tokenizer_name)
            elif not tokenizer_file.is_file():
                raise ValueError(f"tokenizer file not found: {tokenizer_file}")
            self.tokenizer_file = tokenizer_file.resolve()
            self._tokenizer, self._tokenizer_lock = _load_tokenizer(
                str(self.tokenizer_file), config.max_sequence_length
            )
            return
        assert config.image_size is not None
        self.channels = config.channels or 1
        self.height, self.width = config.image_size
        self.mode = _MODE_FOR_CHANNELS[self.channels]
        mean = config.normalization_mean or [0.0]
        std = config.normalization_std or [1.0]
        if len(mean) == 1:
            mean = mean * self.channels
        if len(std) == 1:
            std = std * self.channels
        if len(std) != self.channels:
            raise ValueError(
                f"normalization_std has {len(std)} values for {self.channels} channels"
            )
        levels = np.arange(256, dtype=np.float64) / 255.0
        lut = (levels[None, :] - np.asarray(mean)[:, None]) / np.asarray(std)[:, None]
        self._lut = lut.astype(np.float32)  # (C, 256): byte value -> normalized float
        self.crop_padding = max(1, min(self.height, self.width) // 8)

    def save_config(self, path: str | Path) -> None:
        """Write the preprocessing configuration as JSON (what a model package stores)."""
        Path(path).write_text(self.config.model_dump_json(indent=2))

    def save_tokenizer(self, path: str | Path) -> Path:
        """Write the tokenizer as configured here (truncation, padding) as a tokenizer.json.

        The copy needs no tokenizer_config.json beside it: its padding section names the pad
        token, so `DataPreprocessor(config, tokenizer_file=path)` tokenizes exactly like this.
        """
        if self._tokenizer is None:
            raise ValueError("this preprocessor is for images; it has no tokenizer to save")
        with self._tokenizer_lock:
            text = self._tokenizer.to_str()
        out = Path(path)
        out.write_text(text, encoding="utf-8")
        return out

    def load_config(self, path: str | Path, tokenizer_file: str | Path | None = None) -> None:
        """Replace this preprocessor's configuration with the JSON file at `path`.

        The new transforms are built first: on any error this preprocessor stays as it was.
        """
        fresh = type(self)(_read_config(path), tokenizer_file)
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)

    @classmethod
    def from_file(
        cls, path: str | Path, tokenizer_file: str | Path | None = None
    ) -> DataPreprocessor:
        """A preprocessor for the configuration saved at `path`."""
        return cls(_read_config(path), tokenizer_file)

    # -- public entry points ---------------------------------------------------------------

    def preprocess_train(
        self,
        sample: Any,
        generator: torch.Generator | None = None,
        params: AugmentParams | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """One raw sample → model input, with augmentation when `config.augment` is set.

        The random draw comes from `generator` (torch's global RNG when None) unless `params`
        gives it explicitly. Text has no augmentation.
        """
        import torch

        if self.is_text:
            return self.preprocess_inference(sample)
        batch = self.prepare_image(sample)[None]
        return torch.from_numpy(self.train_batch(batch, generator, params)[0])

    def preprocess_inference(self, sample: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """One raw sample → model input, deterministic (no augmentation)."""
        import torch

        if self.is_text:
            encoded = self.tokenize([sample])
            return {k: torch.from_numpy(v[0]) for k, v in encoded.items()}
        return torch.from_numpy(self.normalize(self.prepare_image(sample)[None])[0])

    def preprocess_inference_batch(self, samples: list[Any]) -> np.ndarray | dict[str, np.ndarray]:
        """Raw samples → one stacked batch for ONNX Runtime (float32 N×C×H×W or int64 N×L)."""
        if len(samples) == 0:
            raise InvalidInputError("empty batch: no samples to preprocess")
        if self.is_text:
            return self.tokenize(list(samples))
        images = np.empty((len(samples), self.height, self.width, self.channels), dtype=np.uint8)
        for i, sample in enumerate(samples):
            try:
                images[i] = self.prepare_image(sample)
            except InvalidInputError as err:
                raise InvalidInputError(f"sample {i}: {err}") from None
        return self.normalize(images)

    decode_image = staticmethod(decode_image)

    # -- images ----------------------------------------------------------------------------

    def prepare_image(self, sample: Any) -> np.ndarray:
        """Decode, convert to `channels` and resize: uint8 H×W×C at `image_size`."""
        if self.is_text:
            raise InvalidInputError("this preprocessor is for text; got an image-like sample")
        if isinstance(sample, bytes | bytearray | memoryview):
            sample = decode_image(bytes(sample))
        if isinstance(sample, np.ndarray):
            arr = _check_array(sample)
            if arr.shape == (self.height, self.width, self.channels):
                return arr  # already model-ready: no PIL round trip
            img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
        elif isinstance(sample, Image.Image):
            img = sample
            if img.mode not in _SUPPORTED_MODES:
                raise InvalidInputError(f"unsupported image mode {img.mode!r}")
        else:
            raise InvalidInputError(
                f"expected an image (PIL.Image, PNG/JPEG bytes or uint8 array), "
                f"got {type(sample).__name__}"
            )
        if img.mode != self.mode:
            img = img.convert(self.mode)
        if img.size != (self.width, self.height):
            img = img.resize((self.width, self.height), RESIZE_INTERPOLATION)
        out = np.asarray(img, dtype=np.uint8)
        return out.reshape(self.height, self.width, self.channels)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×C → float32 N×C×H×W, scaled to [0, 1] then (x - mean) / std."""
        n, h, w, c = images.shape
        out = np.empty((n, c, h, w), dtype=np.float32)
        for ch in range(c):
            np.take(self._lut[ch], images[..., ch], out=out[:, ch])
        return out

    def draw_augmentation(self, n: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Random flip and crop offsets for `n` images, from torch's RNG (seedable, per worker)."""
        import torch

        flip = torch.rand(n, generator=generator) < 0.5
        shift = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator)
        return AugmentParams(flip.numpy(), shift.numpy().astype(np.int64))

    def augment(self, images: np.ndarray, params: AugmentParams) -> np.ndarray:
        """Padded random crop + horizontal flip of uint8 N×H×W×C images, in one gather."""
        n, h, w, _ = images.shape
        p = self.crop_padding
        padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        rows = params.shift[:, :1] + np.arange(h)[None, :]  # (N, H)
        cols_fwd = params.shift[:, 1:] + np.arange(w)[None, :]  # (N, W)
        cols = np.where(params.flip[:, None], cols_fwd[:, ::-1], cols_fwd)
        return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]

    def train_batch(
        self,
        images: np.ndarray,
        generator: torch.Generator | None = None,
        params: AugmentParams | None = None,
    ) -> np.ndarray:
        """uint8 N×H×W×C → float32 N×C×H×W with training augmentation (if enabled)."""
        if self.config.augment:
            if params is None:
                params = self.draw_augmentation(len(images), generator)
            images = self.augment(images, params)
        return self.normalize(images)

    # -- text ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to `vocab_size - 1` (text preprocessors only)."""
        if self._tokenizer is None:
            raise InvalidInputError("this preprocessor is for images; it has no vocabulary")
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def tokenize(self, texts: list[Any]) -> dict[str, np.ndarray]:
        """Texts → int64 `input_ids` and `attention_mask`, N×max_sequence_length."""
        if not self.is_text:
            raise InvalidInputError("this preprocessor is for images; got text")
        for i, text in enumerate(texts):
            where = f"sample {i}: " if len(texts) > 1 else ""
            if not isinstance(text, str):
                raise InvalidInputError(f"{where}expected a string, got {type(text).__name__}")
            if not text.strip():
                raise InvalidInputError(f"{where}empty text")
        if self.config.lowercase:
            texts = [t.lower() for t in texts]
        assert self._tokenizer is not None
        with self._tokenizer_lock:
            encoded = self._tokenizer.encode_batch(texts)
        # Every encoding is padded/truncated to max_sequence_length, so the rows stack.
        return {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        }


def _check_array(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise InvalidInputError(f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in _MODE_FOR_CHANNELS:
        raise InvalidInputError(
            f"image arrays must be H×W or H×W×C with C in 1..4, got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInputError(f"image array is empty: shape {tuple(arr.shape)}")
    return arr


def _read_config(path: str | Path) -> PreprocessingConfig:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"preprocessing config not found: {p}")
    try:
        return PreprocessingConfig.model_validate(json.loads(p.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON: {err}") from None
    except ValidationError as err:
        raise ValueError(f"{p}: invalid preprocessing config: {err}") from None
