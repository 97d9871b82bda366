"""Tokenization through `tokenizers` (what serving installs) against transformers' AutoTokenizer.

The serving extra has no transformers, so `DataPreprocessor` reads tokenizer.json with the Rust
`tokenizers` library; these tests hold it to the exact ids and masks AutoTokenizer gives with
padding="max_length", truncation=True. A model package carries its own tokenizer.json, so a text
model still tokenizes the same once the tokenizer it was trained with is gone.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from text_helpers import make_text_package, write_text_onnx

from dlpipe.config import PipelineConfig, PreprocessingConfig
from dlpipe.data import DataPreprocessor
from dlpipe.data.preprocessing import TOKENIZER_FILE, resolve_tokenizer_file
from dlpipe.models.pretrained import minilm_dir
from dlpipe.tracking.metadata import ModelMetadata, utc_now
from dlpipe.tracking.package import save_model_package

TEXTS = [
    "Hello world",
    "a fine film",
    "Dull, DULL, dull.",
    "x",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\u00a0no-break spaces",
    "Ça va? Naïve café, résumé, Øresund, straße",
    "東京タワー、北京、서울 and 漢字 mixed with English",
    "emoji 🤖🎬🍿 and symbols ™ © ½ ① ﬁ",
    "e\u0301 composed vs é precomposed; zero\u200bwidth",
    "[CLS] [SEP] [PAD] [MASK] [UNK] written as text",
    "don't won't it's — “quotes” and ‘single’ … ellipsis",
    "https://example.com/path?q=1&x=2 email@example.com #tag @user",
    "1234567890 3.14159 -42 1e10 $99.99 50%",
    "supercalifragilisticexpialidocious" * 5,  # one word past WordPiece's 100-character limit
    "The movie was " + "really " * 600 + "long.",  # truncated at every length tested
    " ".join(f"word{i}" for i in range(300)),
    "MiXeD CaSe WoRdS ShOuLd LoWeRcAsE",
]


def text_config(
    tokenizer: str | Path = "minilm", length: int = 16, **kw: Any
) -> PreprocessingConfig:
    return PreprocessingConfig(
        task_type="text_classification",
        image_size=None,
        channels=None,
        normalization_mean=None,
        normalization_std=None,
        tokenizer_name=str(tokenizer),
        max_sequence_length=length,
        **kw,
    )


def auto_tokenize(directory: Path, texts: list[str], length: int) -> dict[str, np.ndarray]:
    """The reference: what the transformers path gave before serving dropped transformers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    out = tok(
        texts,
        padding="max_length",
        truncation=True,
        max_length=length,
        return_token_type_ids=False,
        return_tensors="np",
    )
    return {k: np.asarray(out[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}


def assert_same(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert set(ours) == {"input_ids", "attention_mask"}
    for key in ("input_ids", "attention_mask"):
        assert ours[key].dtype == np.int64 and ours[key].shape == ref[key].shape, key
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)


@pytest.mark.parametrize("lowercase", [False, True])
@pytest.mark.parametrize("length", [3, 8, 16, 64, 128, 512])
def test_minilm_tokens_match_autotokenizer(length: int, lowercase: bool) -> None:
    pre = DataPreprocessor(text_config(length=length, lowercase=lowercase))
    ours = pre.tokenize(TEXTS)
    expected_input = [t.lower() for t in TEXTS] if lowercase else TEXTS
    ref = auto_tokenize(minilm_dir(), expected_input, length)
    assert_same(ours, ref)
    # The long texts really were cut: every position is a real token.
    assert ours["attention_mask"][-3].sum() == length


@settings(max_examples=150, deadline=None)
@given(text=st.text(min_size=1, max_size=300).filter(lambda t: t.strip() != ""))
def test_any_text_tokenizes_like_autotokenizer(text: str) -> None:
    pre = DataPreprocessor(text_config(length=24))
    assert_same(pre.tokenize([text]), auto_tokenize(minilm_dir(), [text], 24))


def test_minilm_ships_a_tokenizer_json() -> None:
    assert (minilm_dir() / TOKENIZER_FILE).is_file()
    assert resolve_tokenizer_file("minilm") == minilm_dir() / TOKENIZER_FILE
    assert resolve_tokenizer_file(str(minilm_dir())) == minilm_dir() / TOKENIZER_FILE


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-BERT tokenizer: BPE, `<pad>` at id 3, padding and truncation on the left.

    The pad token and sides live only in tokenizer_config.json, as transformers expects them.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    out = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False
    )
    tok.train_from_iterator(TEXTS[:6] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tok.save(str(out / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": {"__type": "AddedToken", "content": "<pad>", "special": True},
        "padding_side": "left",
        "truncation_side": "left",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("length", [3, 5, 12, 40])
def test_local_tokenizer_directory_matches_autotokenizer(bpe_dir: Path, length: int) -> None:
    ours = DataPreprocessor(text_config(bpe_dir, length)).tokenize(TEXTS)
    assert_same(ours, auto_tokenize(bpe_dir, TEXTS, length))
    if length == 40:  # short texts are padded on the left with <pad> (id 3)
        assert ours["input_ids"][3, 0] == 3 and ours["attention_mask"][3, 0] == 0


def test_tokenizer_errors_are_clear(tmp_path: Path, bpe_dir: Path) -> None:
    with pytest.raises(ValueError, match="too short: the tokenizer adds 2 special tokens"):
        DataPreprocessor(text_config(bpe_dir, 2))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"no {TOKENIZER_FILE} at"):
        DataPreprocessor(text_config(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"not a tokenizers tokenizer\.json"):
        DataPreprocessor(text_config(broken))
    no_pad = tmp_path / "no_pad"
    no_pad.mkdir()
    shutil.copy(bpe_dir / TOKENIZER_FILE, no_pad / TOKENIZER_FILE)
    with pytest.raises(ValueError, match="no padding token"):
        DataPreprocessor(text_config(no_pad))
    with pytest.raises(ValueError, match="tokenizer file not found"):
        DataPreprocessor(text_config(), tokenizer_file=tmp_path / "missing.json")


def test_a_package_tokenizes_with_its_own_copy_once_the_original_is_gone(
    tmp_path: Path, bpe_dir: Path
) -> None:
    original = tmp_path / "tokenizer-at-training"
    shutil.copytree(bpe_dir, original)
    package = make_text_package(tmp_path, original, length=12)
    config = DataPreprocessor.from_file(package / "preprocessing.json").config
    before = DataPreprocessor(config).tokenize(TEXTS)

    shutil.rmtree(original)  # the training machine's tokenizer is not where serving runs
    with pytest.raises(ValueError, match="neither 'minilm' nor an existing local directory"):
        DataPreprocessor(config)
    copy = package / TOKENIZER_FILE
    # The copy alone (no tokenizer_config.json beside it) keeps the left <pad> padding.
    assert not (package / "tokenizer_config.json").exists()
    served = DataPreprocessor.from_file(package / "preprocessing.json", tokenizer_file=copy)
    assert_same(served.tokenize(TEXTS), before)
    assert served.tokenizer_file == copy.resolve()
    # Pickled (DataLoader workers, Ray) it keeps using the package's copy.
    assert_same(pickle.loads(pickle.dumps(served)).tokenize(TEXTS), before)


def test_minilm_package_copy_matches_autotokenizer(tmp_path: Path) -> None:
    package = make_text_package(tmp_path, "minilm", length=16)
    copy = package / TOKENIZER_FILE
    served = DataPreprocessor.from_file(package / "preprocessing.json", tokenizer_file=copy)
    assert_same(served.tokenize(TEXTS), auto_tokenize(minilm_dir(), TEXTS, 16))


def test_image_packages_get_no_tokenizer(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate({"preprocessing": {"class_names": ["a", "b"]}})
    meta = ModelMetadata(
        model_name="img",
        framework="onnx",
        precision="fp32",
        model_size_mb=0.0,
        training_date=utc_now(),
        accuracy_metrics={},
        preprocessing_config=cfg.preprocessing,
    )
    # Any ONNX file will do: only the files the package gets are checked.
    onnx_path = write_text_onnx(tmp_path / "m.onnx")
    package = save_model_package(tmp_path / "pkg", cfg, meta, onnx_path=onnx_path)
    assert (package / "model.onnx").is_file() and not (package / TOKENIZER_FILE).exists()
    with pytest.raises(ValueError, match="no tokenizer to save"):
        DataPreprocessor(cfg.preprocessing).save_tokenizer(tmp_path / "t.json")
