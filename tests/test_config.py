"""Configuration: YAML + overrides load, and bad input fails early naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlpipe.config import ConfigError, PipelineConfig, load_config, save_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert cfg.training.model_type == cfg.model.name
    out = tmp_path / "c.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_required_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"fashion_mnist", "fashion_mnist_resnet18", "rotten_tomatoes_minilm"} <= names


def test_overrides_are_typed() -> None:
    cfg = load_config(
        CONFIGS[0],
        [
            "training.learning_rate=0.01",
            "training.num_epochs=2",
            "preprocessing.augment=false",
            "training.precision=32",
        ],
    )
    assert cfg.training.precision == "32"
    assert cfg.training.learning_rate == 0.01
    assert cfg.training.num_epochs == 2
    assert cfg.preprocessing.augment is False


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("training.learning_rate=-0.1", "training.learning_rate"),
        ("training.lerning_rate=0.1", "training.lerning_rate: unknown key"),
        ("training.batch_size=many", "training.batch_size"),
        ("model.name=resnet9000", "unknown model 'resnet9000'; allowed: bert-base"),
        ("training.strategy=horovod", "training.strategy"),
        ("training.precision=16-mixed", "needs a GPU"),
        ("preprocessing.normalization_std=[0.0]", "must be > 0"),
        ("nonsense", "section.key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS[0], [override])
    assert needle in str(err.value)


def test_cross_section_mismatch_is_refused() -> None:
    with pytest.raises(ConfigError, match="text_classification"):
        load_config(None, ["model.name=minilm", "model.num_classes=2"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_flat_params_cover_every_field() -> None:
    cfg = PipelineConfig()
    flat = cfg.flat_params()
    assert flat["training.learning_rate"] == str(cfg.training.learning_rate)
    assert flat["model.name"] == "simple_cnn"
    assert "preprocessing.normalization_mean" in flat
    for section in ("model", "data", "preprocessing", "training", "tracking", "optimize"):
        fields = type(getattr(cfg, section)).model_fields
        for name in fields:
            assert f"{section}.{name}" in flat or any(
                k.startswith(f"{section}.{name}.") for k in flat
            ), f"{section}.{name} missing"


def test_reading_a_config_imports_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from dlpipe.config import load_config; load_config(None, "
        "['training.num_gpus=4', 'model.name=resnet50', 'model.in_channels=3', "
        "'preprocessing.channels=3']); "
        "print(sorted(m for m in ('torch', 'torchvision', 'lightning', 'tensorflow') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_gpu_config_loads_anywhere_and_the_job_start_checks_the_machine() -> None:
    from dlpipe.training.devices import check_devices, cuda_device_count

    cfg = load_config(CONFIGS[0], ["training.num_gpus=64"])  # describes a job, checks nothing
    assert cfg.training.num_gpus == 64
    with pytest.raises(ConfigError, match=f"num_gpus=64 but {cuda_device_count()} CUDA"):
        check_devices(cfg.training)


def test_model_type_is_the_design_name_for_model_name() -> None:
    cfg = load_config(None, ["training.model_type=resnet18", "model.in_channels=3",
                             "preprocessing.channels=3"])  # fmt: skip
    assert cfg.model.name == "resnet18" and cfg.training.model_type == "resnet18"
    with pytest.raises(ConfigError, match="disagree"):
        load_config(None, ["training.model_type=resnet18", "model.name=simple_cnn"])
    with pytest.raises(ConfigError, match="unknown model 'resnet9000'"):
        load_config(None, ["training.model_type=resnet9000"])
