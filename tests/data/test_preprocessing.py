"""DataPreprocessor unit tests: normalization, resize, channels, augmentation, text, bad input."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlpipe.config import PreprocessingConfig
from dlpipe.data import DataPreprocessor, InvalidInputError, decode_image
from dlpipe.data.preprocessing import AugmentParams


def image_config(**kw: object) -> PreprocessingConfig:
    base: dict[str, object] = {
        "image_size": (8, 8),
        "channels": 1,
        "normalization_mean": [0.5],
        "normalization_std": [0.5],
    }
    base.update(kw)
    return PreprocessingConfig.model_validate(base)


def test_normalization_with_known_mean_and_std() -> None:
    pre = DataPreprocessor(
        image_config(
            image_size=(1, 3),
            channels=3,
            normalization_mean=[0.5, 0.0, 0.2],
            normalization_std=[0.5, 1.0, 0.4],
        )
    )
    pixels = np.array([[[0, 255, 51], [255, 0, 102], [51, 51, 255]]], dtype=np.uint8)  # 1×3×3
    out = pre.preprocess_inference(pixels)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    expected = (pixels.astype(np.float64) / 255 - [0.5, 0.0, 0.2]) / [0.5, 1.0, 0.4]
    np.testing.assert_allclose(out.numpy(), expected.transpose(2, 0, 1), atol=1e-6)
    assert out[0, 0, 0].item() == pytest.approx(-1.0) and out[0, 0, 1].item() == pytest.approx(1.0)


def test_extreme_pixel_values_map_to_exact_bounds(gray_preprocessor: DataPreprocessor) -> None:
    black = gray_preprocessor.preprocess_inference(np.zeros((8, 8), np.uint8))
    white = gray_preprocessor.preprocess_inference(np.full((8, 8), 255, np.uint8))
    assert torch.all(black == -1.0) and torch.all(white == 1.0)


def test_without_normalization_values_are_in_unit_range() -> None:
    pre = DataPreprocessor(image_config(normalization_mean=None, normalization_std=None))
    out = pre.preprocess_inference(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    assert isinstance(out, torch.Tensor)
    assert out.min().item() == 0.0 and out.max().item() == pytest.approx(252 / 255)


def test_resize_to_configured_height_and_width() -> None:
    pre = DataPreprocessor(image_config(image_size=(7, 5)))
    out = pre.preprocess_inference(np.full((40, 30), 200, np.uint8))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 7, 5)
    # A constant image stays constant through bilinear resizing.
    assert torch.allclose(out, torch.full((1, 7, 5), (200 / 255 - 0.5) / 0.5))


def test_resize_uses_bilinear_interpolation() -> None:
    pre = DataPreprocessor(
        image_config(image_size=(4, 4), normalization_mean=None, normalization_std=None)
    )
    source = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(source).resize((4, 4), Image.Resampling.BILINEAR))
    out = pre.preprocess_inference(source)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out[0].numpy(), expected / 255, atol=1e-7)


def test_channel_conversion_rgb_to_gray_and_gray_to_rgb(encode_image: Callable[..., bytes]) -> None:
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    gray = DataPreprocessor(image_config(normalization_mean=None, normalization_std=None))
    out = gray.prepare_image(encode_image(red))
    assert out.shape == (8, 8, 1) and np.all(out == 76)  # ITU-R 601: 0.299 * 255
    rgb = DataPreprocessor(image_config(channels=3))
    out3 = rgb.prepare_image(np.full((8, 8), 9, np.uint8))
    assert out3.shape == (8, 8, 3) and np.all(out3 == 9)


def test_all_input_kinds_give_the_same_tensor(
    gray_preprocessor: DataPreprocessor, encode_image: Callable[..., bytes]
) -> None:
    array = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    from_array = gray_preprocessor.preprocess_inference(array)
    assert isinstance(from_array, torch.Tensor)
    for sample in (array[..., None], Image.fromarray(array), encode_image(array)):
        out = gray_preprocessor.preprocess_inference(sample)
        assert isinstance(out, torch.Tensor)
        assert torch.equal(out, from_array)


def test_batch_matches_single_samples(
    gray_preprocessor: DataPreprocessor, encode_image: Callable[..., bytes]
) -> None:
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (h, 9), dtype=np.uint8) for h in (8, 12, 3)]
    batch = gray_preprocessor.preprocess_inference_batch([encode_image(i) for i in images])
    assert isinstance(batch, np.ndarray) and batch.dtype == np.float32
    assert batch.shape == (3, 1, 8, 8)
    for row, image in zip(batch, images, strict=True):
        single = gray_preprocessor.preprocess_inference(image)
        assert isinstance(single, torch.Tensor)
        np.testing.assert_array_equal(row, single.numpy())


def test_augmentation_flip_and_crop_are_exact(gray_preprocessor: DataPreprocessor) -> None:
    pre = gray_preprocessor
    pad = pre.crop_padding
    image = np.random.default_rng(3).integers(1, 256, (1, 8, 8, 1), dtype=np.uint8)
    flipped = pre.augment(image, AugmentParams(np.array([True]), np.array([[pad, pad]])))
    np.testing.assert_array_equal(flipped, image[:, :, ::-1])
    shifted = pre.augment(image, AugmentParams(np.array([False]), np.array([[0, 2 * pad]])))
    # Window at the top-right of the zero-padded image: pad rows of zeros on top, image moved left.
    assert np.all(shifted[0, :pad] == 0) and np.all(shifted[0, :, -pad:] == 0)
    np.testing.assert_array_equal(shifted[0, pad:, : 8 - pad], image[0, : 8 - pad, pad:])


def test_training_augmentation_is_random_but_seeded(gray_preprocessor: DataPreprocessor) -> None:
    image = np.random.default_rng(4).integers(0, 256, (8, 8), dtype=np.uint8)
    inference = gray_preprocessor.preprocess_inference(image)
    draws = [
        gray_preprocessor.preprocess_train(image, generator=torch.Generator().manual_seed(s))
        for s in range(20)
    ]
    assert any(not torch.equal(d, inference) for d in draws)  # type: ignore[arg-type]
    again = gray_preprocessor.preprocess_train(image, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, draws[5])  # type: ignore[arg-type]


def test_augmentation_disabled_makes_training_deterministic() -> None:
    pre = DataPreprocessor(image_config(augment=False))
    image = np.random.default_rng(5).integers(0, 256, (8, 8), dtype=np.uint8)
    for seed in range(5):
        out = pre.preprocess_train(image, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out, pre.preprocess_inference(image))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty upload"),
        (b"hello, this is not an image at all", "not an image"),
        ("a string", "expected image bytes"),
    ],
)
def test_decode_image_rejects_bad_bytes(payload: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_image(payload)  # type: ignore[arg-type]


def test_decode_image_rejects_truncated_file(encode_image: Callable[..., bytes]) -> None:
    noise = np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        data = encode_image(noise, fmt)
        with pytest.raises(InvalidInputError, match=f"truncated or corrupt {fmt}"):
            decode_image(data[: len(data) // 2])


def test_decode_image_rejects_16_bit_mode() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(buf, format="PNG")
    with pytest.raises(InvalidInputError, match="unsupported PNG image mode 'I;16'"):
        decode_image(buf.getvalue())


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (np.zeros((8, 8), np.float32), "must be uint8"),
        (np.zeros((2, 8, 8, 1), np.uint8), "H×W or H×W×C"),
        (np.zeros((8, 8, 5), np.uint8), "H×W or H×W×C"),
        (np.zeros((0, 8), np.uint8), "empty"),
        ([1, 2, 3], "expected an image"),
        ("text", "expected an image"),
    ],
)
def test_bad_image_samples_are_rejected(
    gray_preprocessor: DataPreprocessor, sample: object, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        gray_preprocessor.preprocess_inference(sample)


def test_bad_sample_in_batch_is_named_by_index(
    gray_preprocessor: DataPreprocessor, encode_image: Callable[..., bytes]
) -> None:
    good = encode_image(np.zeros((8, 8), np.uint8))
    with pytest.raises(InvalidInputError, match="sample 1: empty upload"):
        gray_preprocessor.preprocess_inference_batch([good, b"", good])
    with pytest.raises(InvalidInputError, match="empty batch"):
        gray_preprocessor.preprocess_inference_batch([])


def test_tokenization_of_sample_texts(text_preprocessor: DataPreprocessor) -> None:
    out = text_preprocessor.preprocess_inference("Hello world")
    assert isinstance(out, dict) and set(out) == {"input_ids", "attention_mask"}
    # [CLS] hello world [SEP] and padding, in BERT's uncased WordPiece vocabulary.
    assert out["input_ids"].tolist() == [101, 7592, 2088, 102] + [0] * 12
    assert out["attention_mask"].tolist() == [1] * 4 + [0] * 12
    assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
    long = text_preprocessor.preprocess_inference("word " * 100)
    assert isinstance(long, dict)
    assert long["input_ids"].shape == (16,) and long["input_ids"][-1].item() == 102
    assert long["attention_mask"].sum().item() == 16


def test_text_batch_is_int64_and_matches_singles(text_preprocessor: DataPreprocessor) -> None:
    texts = ["a fine film", "Dull, DULL, dull.", "ok"]
    batch = text_preprocessor.preprocess_inference_batch(texts)
    assert isinstance(batch, dict)
    assert batch["input_ids"].shape == (3, 16) and batch["input_ids"].dtype == np.int64
    for i, text in enumerate(texts):
        single = text_preprocessor.preprocess_train(text)
        assert isinstance(single, dict)
        np.testing.assert_array_equal(batch["input_ids"][i], single["input_ids"].numpy())


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ("", "empty text"),
        ("   \n", "empty text"),
        (None, "expected a string"),
        (b"bytes", "expected a string"),
    ],
)
def test_bad_text_is_rejected(
    text_preprocessor: DataPreprocessor, sample: object, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        text_preprocessor.preprocess_inference(sample)
    with pytest.raises(InvalidInputError, match=f"sample 1: {message}"):
        text_preprocessor.preprocess_inference_batch(["fine", sample])


def test_text_preprocessor_refuses_images(text_preprocessor: DataPreprocessor) -> None:
    with pytest.raises(InvalidInputError, match="for text"):
        text_preprocessor.prepare_image(np.zeros((4, 4), np.uint8))


def text_config(**kw: object) -> PreprocessingConfig:
    base: dict[str, object] = {
        "task_type": "text_classification",
        "image_size": None,
        "channels": None,
        "normalization_mean": None,
        "normalization_std": None,
        "tokenizer_name": "minilm",
        "max_sequence_length": 8,
    }
    base.update(kw)
    return PreprocessingConfig.model_validate(base)


def test_text_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too short: the tokenizer adds 2 special tokens"):
        DataPreprocessor(text_config(max_sequence_length=2))
    with pytest.raises(ValueError, match="neither 'minilm' nor an existing local directory"):
        DataPreprocessor(text_config(tokenizer_name=str(tmp_path / "nope")))


def test_local_tokenizer_path_works(tmp_path: Path) -> None:
    from dlpipe.models.pretrained import minilm_dir

    local = DataPreprocessor(text_config(tokenizer_name=str(minilm_dir())))
    shipped = DataPreprocessor(text_config())
    a, b = local.preprocess_inference("same text"), shipped.preprocess_inference("same text")
    assert isinstance(a, dict) and isinstance(b, dict)
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_save_and_load_config(tmp_path: Path, gray_preprocessor: DataPreprocessor) -> None:
    path = tmp_path / "preprocessing.json"
    gray_preprocessor.save_config(path)
    loaded = DataPreprocessor.from_file(path)
    assert loaded.config == gray_preprocessor.config
    other = DataPreprocessor(PreprocessingConfig())
    other.load_config(path)
    assert other.config == gray_preprocessor.config and other.height == 8


def test_bad_config_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="preprocessing config not found"):
        DataPreprocessor.from_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DataPreprocessor.from_file(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"image_size": [0, 4]}')
    with pytest.raises(ValueError, match="invalid preprocessing config"):
        DataPreprocessor.from_file(wrong)
    # A failed load leaves the preprocessor as it was.
    no_tokenizer = tmp_path / "text.json"
    no_tokenizer.write_text(text_config(tokenizer_name=str(tmp_path / "gone")).model_dump_json())
    pre = DataPreprocessor(PreprocessingConfig())
    image = np.zeros((28, 28), np.uint8)
    before = pre.preprocess_inference(image)
    for bad in (wrong, no_tokenizer):
        with pytest.raises(ValueError):
            pre.load_config(bad)
        assert pre.config == PreprocessingConfig()
        assert torch.equal(pre.preprocess_inference(image), before)  # type: ignore[arg-type]


def test_package_preprocessing_json_loads(tmp_path: Path) -> None:
    # dlpipe.tracking.package writes cfg.preprocessing.model_dump_json(); serving reads it here.
    config = image_config(channels=3, class_names=["a", "b"])
    (tmp_path / "preprocessing.json").write_text(config.model_dump_json(indent=2))
    assert DataPreprocessor.from_file(tmp_path / "preprocessing.json").config == config


def test_decoded_image_and_bytes_give_identical_input(encode_image: Callable[..., bytes]) -> None:
    # Serving may decode an upload first and preprocess the PIL image later: same pixels.
    pre = DataPreprocessor(image_config(image_size=(30, 40), channels=3))
    photo = np.random.default_rng(7).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    data = encode_image(photo, "JPEG")
    from_bytes = pre.preprocess_inference(data)
    assert isinstance(from_bytes, torch.Tensor) and from_bytes.shape == (3, 30, 40)
    assert torch.equal(from_bytes, pre.preprocess_inference(decode_image(data)))  # type: ignore[arg-type]


def test_preprocessor_pickles_by_config(
    gray_preprocessor: DataPreprocessor, text_preprocessor: DataPreprocessor
) -> None:
    import pickle

    image = np.random.default_rng(8).integers(0, 256, (8, 8), dtype=np.uint8)
    for pre, sample in ((gray_preprocessor, image), (text_preprocessor, "pickled text")):
        copy = pickle.loads(pickle.dumps(pre))
        assert copy.config == pre.config
        a, b = copy.preprocess_inference(sample), pre.preprocess_inference(sample)
        if isinstance(a, dict):
            assert isinstance(b, dict) and torch.equal(a["input_ids"], b["input_ids"])
        else:
            assert torch.equal(a, b)  # type: ignore[arg-type]


def test_every_truncation_of_a_png_is_a_clear_input_error() -> None:
    import io

    import numpy as np
    from PIL import Image

    from dlpipe.data.preprocessing import InvalidInputError, decode_image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    for n in range(1, len(data)):
        # Either a clear input error, or (cut only in the trailing IEND chunk) the whole image.
        try:
            image = decode_image(data[:n])
        except InvalidInputError:
            continue
        assert np.array_equal(np.asarray(image), np.zeros((28, 28), np.uint8)), n
