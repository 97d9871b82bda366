"""Model registry: every registered architecture builds and runs a forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dlpipe.config import PreprocessingConfig
from dlpipe.data import DataPreprocessor
from dlpipe.models import (
    create_model,
    example_inputs,
    input_names,
    list_models,
    model_task,
    register_model,
)
from dlpipe.models.cli import main as models_cli

# PyTorch models only: the Keras ones are built and run in TensorFlow processes (tests/tensorflow).
IMAGE_MODELS = list_models("image_classification", framework="pytorch")
TEXT_MODELS = list_models("text_classification", framework="pytorch")
TEXT_PRE = PreprocessingConfig(
    task_type="text_classification",
    image_size=None,
    channels=None,
    normalization_mean=None,
    normalization_std=None,
    tokenizer_name="minilm",
    max_sequence_length=16,
)
TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def test_registry_has_the_required_models() -> None:
    required = {"simple_cnn", "resnet18", "resnet50", "mobilenet_v3_small"}
    assert required <= set(IMAGE_MODELS)
    assert {"minilm", "bert-base"} <= set(TEXT_MODELS)
    assert sorted(IMAGE_MODELS + TEXT_MODELS) == list_models(framework="pytorch")
    assert all(model_task(n) == "image_classification" for n in IMAGE_MODELS)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_model_forward_shape(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    net = create_model(name, num_classes=7, in_channels=in_channels, dropout=0.2)
    pre = PreprocessingConfig(
        image_size=(28, 28), channels=in_channels, normalization_mean=[0.5], normalization_std=[0.5]
    )
    (x,) = example_inputs(name, 2, pre)
    assert x.shape == (2, in_channels, 28, 28)
    net.eval()
    with torch.no_grad():
        logits = net(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert input_names(name) == ["input"]


def test_resnet_small_input_stem() -> None:
    net = create_model("resnet18", 10, 1, small_input=True).eval()
    assert isinstance(net.maxpool, nn.Identity)  # type: ignore[union-attr]
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_simple_cnn_trains_and_takes_any_input_size() -> None:
    net = create_model("simple_cnn", 3, 1).train()
    logits = net(torch.randn(2, 1, 64, 48))  # adaptive pooling: the head ignores input size
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_unknown_model_lists_the_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet9000'; allowed: .*simple_cnn"):
        create_model("resnet9000", 10)
    with pytest.raises(ValueError, match=r"allowed: .*minilm"):
        model_task("nope")


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("simple_cnn", "image_classification")(lambda **kw: nn.Identity())


def test_pretrained_torchvision_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="weights_path"):
        create_model("resnet18", 10, 3, pretrained=True)
    with pytest.raises(ValueError, match="no offline pretrained weights"):
        create_model("bert-base", 2, pretrained=True, **TINY_BERT)


def test_weights_path_loads_state_dict_and_lightning_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_model("simple_cnn", 4, 1).eval()
    x = torch.randn(3, 1, 28, 28)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    ckpt = {"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "last.ckpt")
    with torch.no_grad():
        expected = source(x)
        for file in ("weights.pt", "last.ckpt"):
            loaded = create_model("simple_cnn", 4, 1, weights_path=str(tmp_path / file)).eval()
            assert torch.equal(loaded(x), expected)
    with pytest.raises(FileNotFoundError, match="weights_path not found"):
        create_model("simple_cnn", 4, 1, weights_path=str(tmp_path / "missing.pt"))


def test_minilm_forward_on_two_sentences() -> None:
    pre = DataPreprocessor(TEXT_PRE)
    batch = pre.preprocess_inference_batch(["A wonderful, moving film.", "Dull and far too long."])
    assert isinstance(batch, dict)
    ids, mask = (torch.from_numpy(batch[k]) for k in input_names("minilm"))
    net = create_model("minilm", num_classes=2, pretrained=True).eval()
    with torch.no_grad():
        logits = net(ids, mask)
        assert logits.shape == (2, 2) and torch.isfinite(logits).all()
        # The packaged pretrained encoder, not a random one: paraphrases embed close together.
        texts = ["a great movie", "an excellent film", "the stock market fell sharply"]
        enc = pre.preprocess_inference_batch(texts)
        assert isinstance(enc, dict)
        m = torch.from_numpy(enc["attention_mask"]).unsqueeze(-1).float()
        hidden = net.encoder(
            input_ids=torch.from_numpy(enc["input_ids"]),  # type: ignore[operator]
            attention_mask=m.squeeze(-1).long(),
        ).last_hidden_state
        pooled = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


def test_bert_base_builds_from_small_config() -> None:
    net = create_model("bert-base", num_classes=3, **TINY_BERT).eval()
    ids, mask = example_inputs("bert-base", 2, TEXT_PRE)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    with torch.no_grad():
        assert net(ids, mask).shape == (2, 3)
    assert input_names("bert-base") == ["input_ids", "attention_mask"]


def test_models_cli_lists_tasks_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert models_cli(["--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        listed["minilm"] == "text_classification" and listed["resnet18"] == "image_classification"
    )
