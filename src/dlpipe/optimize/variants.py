"""Variants of a version in the MLflow Model Registry: built, gated, timed and registered.

    report = optimize_version("fashion_mnist_cnn", "champion", ["onnx", "int8", "fp16"])

Each target is built from the parent, evaluated on the real held-out test split
(`dlpipe.data.build_datamodule` on the package's config.yaml), timed at batch 1, and
registered as a new version naming its parent only when its accuracy drop is within
`max_accuracy_drop`. A failed export or quantization is reported per target; the others go on.

What the variants start from depends on the parent package's files:

- `weights.pt` (PyTorch): the network is rebuilt and exported; the baseline is PyTorch's.
- `model.keras` (TensorFlow): tf2onnx exports it in a TensorFlow subprocess with parity on the
  first 100 preprocessed test samples; the baseline predictions are Keras's own (another
  subprocess), its latency the FP32 ONNX graph's (TensorFlow never runs in this process).
- `model.onnx` only (an imported model): the graph itself is the FP32 starting point and the
  baseline; the `onnx` target is skipped (the parent already is that graph).

`pruned` needs PyTorch weights and is skipped for the other two.

`tensorrt` is the FP32 graph on ONNX Runtime's TensorRT execution provider in FP16, its engine
built here into the package's `trt_cache/` (`dlpipe.tracking.tensorrt_ep`), parity-checked
against the FP32 graph on CPU (`FP16_PARITY_ATOL`/`RTOL` in `dlpipe.optimize.tensorrt`), then
gated, timed and registered like the others with framework `tensorrt`. Where ONNX Runtime offers
no TensorRT provider it is skipped with one line.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dlpipe.optimize.accuracy import (
    AccuracyDegradationError,
    check_accuracy_gate,
    predictions,
    validate_accuracy,
)
from dlpipe.optimize.latency import LatencyStats, measure_latency
from dlpipe.optimize.onnx_export import ExportError, export_architecture, make_session
from dlpipe.optimize.optimizer import ModelOptimizer
from dlpipe.optimize.quantize import QuantizationError, onnx_size_mb

log = logging.getLogger(__name__)

TARGETS = ("onnx", "int8", "fp16", "pruned", "tensorrt")
PRECISION = {"onnx": "fp32", "int8": "int8", "fp16": "fp16", "pruned": "fp32", "tensorrt": "fp16"}


@dataclass
class VariantResult:
    """One target's outcome: `kept` (registered), `refused` (gate), `skipped` or `failed`."""

    target: str
    status: str
    precision: str
    size_mb: float | None = None
    accuracy: float | None = None
    drop: float | None = None
    latency: LatencyStats | None = None
    version: str | None = None
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    """The variant's MLflow run, a child of the parent version's run (when registering)."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["latency"] = self.latency.to_dict() if self.latency else None
        return out


@dataclass
class OptimizationReport:
    """The parent version, its baseline on the same test split, and every variant."""

    model_name: str
    parent_version: str
    baseline_accuracy: float
    baseline_size_mb: float
    baseline_latency: LatencyStats | None
    test_samples: int
    variants: list[VariantResult]
    parent_framework: str = "pytorch"
    """What the parent runs on; for tensorflow, `baseline_latency` is its FP32 ONNX graph's."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["baseline_latency"] = self.baseline_latency.to_dict() if self.baseline_latency else None
        out["variants"] = [v.to_dict() for v in self.variants]
        return out


def parse_targets(text: str | Sequence[str]) -> list[str]:
    """`"onnx,int8"` or a list -> validated, de-duplicated target names."""
    items = text.split(",") if isinstance(text, str) else list(text)
    targets = [t.strip().lower() for t in items if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown targets {unknown or targets}; allowed: {', '.join(TARGETS)}")
    return list(dict.fromkeys(targets))


def optimize_version(
    name: str,
    version_or_alias: str | int | None,
    targets: Sequence[str] | None = None,
    max_accuracy_drop: float | None = None,
    *,
    registry: Any = None,
    register: bool = True,
    calibration_samples: int | None = None,
    limit_eval_samples: int | None = None,
    measure: bool = True,
    work_dir: str | Path | None = None,
    progress: Callable[[str, str], None] | None = None,
) -> OptimizationReport:
    """Build, gate, time and register each target variant of a registered version.

    Args:
        version_or_alias: a version number, an alias such as `champion`, or None (latest).
        targets: subset of `TARGETS` (default: the package config's `optimize.targets`).
        max_accuracy_drop: largest allowed accuracy loss as a fraction (0.01 = 1 point);
            default: the package config's `optimize.max_accuracy_drop`.
        registry: a `ModelRegistry` (default: one on MLFLOW_REGISTRY_URI).
        register: False builds and gates without registering (a dry run).
        calibration_samples: INT8 calibration size (default: the package's optimize config).
        limit_eval_samples: cap the test split (quick runs).
        progress: called with (item, step) as work starts: item "parent" (steps download,
            evaluate, time) or a target (build, evaluate, time, register); step "done" ends one.
    """
    from dlpipe.data import build_datamodule
    from dlpipe.tracking.registry import ModelRegistry

    if targets is not None:
        parse_targets(targets)  # bad targets fail before anything is downloaded
    if max_accuracy_drop is not None and not 0.0 <= max_accuracy_drop <= 1.0:
        raise ValueError(f"max_accuracy_drop must be within [0, 1], got {max_accuracy_drop}")
    registry = registry or ModelRegistry()
    say = progress or (lambda item, step: None)
    say("parent", "download")
    package = Path(registry.get_model(name, version_or_alias))
    parent = registry.get_metadata(name, version_or_alias)
    kind = parent_kind(package)
    if kind == "onnx" and parent.precision != "fp32":
        raise ValueError(
            f"version {parent.version} of {name!r} is a {parent.precision} variant; optimize its "
            f"parent (version {parent.parent_version}) instead"
        )
    cfg = _package_config(package)
    chosen = parse_targets(targets if targets is not None else cfg.optimize.targets)
    max_drop = cfg.optimize.max_accuracy_drop if max_accuracy_drop is None else max_accuracy_drop
    eval_cfg = cfg.model_copy(deep=True)  # the variants' config.yaml stays the parent's
    if limit_eval_samples:
        eval_cfg.data.limit_eval_samples = limit_eval_samples
    say("parent", "evaluate")
    datamodule = build_datamodule(eval_cfg)
    test_batches = list(datamodule.test_dataloader())
    labels = np.concatenate([np.asarray(y) for _, y in test_batches])

    def inputs(batch: int) -> tuple[Any, ...]:
        assert optimizer is not None  # timing happens only with a graph to time
        return optimizer.example_inputs(batch)

    with tempfile.TemporaryDirectory(prefix="dlpipe-optimize-") as tmp:
        work = Path(work_dir or tmp)
        start = _start(kind, package, cfg, work, test_batches)
        optimizer, original_pred = start.optimizer, start.predictions
        baseline = float((original_pred == labels).mean())
        ctx = _Context(
            name, parent, cfg, registry, register, max_drop, test_batches,
            original_pred, measure, inputs, work, progress=say,
        )  # fmt: skip
        results = []
        for target in chosen:
            try:
                results.append(
                    _build_target(target, optimizer, ctx, datamodule, calibration_samples, start)
                )
            except (ExportError, QuantizationError) as err:
                results.append(VariantResult(target, "failed", PRECISION[target], reason=str(err)))
            say(target, "done")
        if register:  # refused, skipped and failed variants are compared in the UI too
            _log_unregistered(ctx, results)
        if measure:
            say("parent", "time")
        baseline_latency = None
        if measure and optimizer is not None:
            # PyTorch eager for a PyTorch parent; the FP32 graph for the others.
            timed = optimizer.model if optimizer.model is not None else optimizer.fp32_onnx()
            baseline_latency = measure_latency(timed, inputs)
        say("parent", "done")
    return OptimizationReport(
        name, parent.version, baseline, parent.model_size_mb, baseline_latency,
        int(labels.size), results, parent_framework=parent.framework,
    )  # fmt: skip


ParentKind = Literal["pytorch", "keras", "onnx"]


def parent_kind(package: Path) -> ParentKind:
    """Which files the variants start from (see the module docstring)."""
    from dlpipe.tracking.package import KERAS_FILE, MODEL_FILES, ONNX_FILE, WEIGHTS_FILE

    if (package / WEIGHTS_FILE).is_file():
        return "pytorch"
    if (package / KERAS_FILE).is_file():
        return "keras"
    if (package / ONNX_FILE).is_file():
        return "onnx"
    raise FileNotFoundError(f"{package} has none of {MODEL_FILES}")


def _package_config(package: Path) -> Any:
    from dlpipe.tracking.package import CONFIG_FILE, load_package_config

    if not (package / CONFIG_FILE).is_file():
        # Imported with --preprocessing only: no data config, so no test split to gate on.
        raise FileNotFoundError(
            f"{package} has no {CONFIG_FILE}: the version was imported without a data config; "
            "import it again with -c CONFIG.yaml to optimize it"
        )
    return load_package_config(package)


@dataclass
class _Start:
    """The parent as the variants see it."""

    optimizer: ModelOptimizer | None
    """None when the FP32 ONNX graph could not be made (`export_error` says why)."""
    predictions: np.ndarray
    export_error: ExportError | None = None
    kind: ParentKind = "pytorch"


def _numpy_batch(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: np.asarray(v) for k, v in x.items()}
    return np.asarray(x)


def first_samples(batches: list[Any], count: int) -> Any:
    """The first `count` preprocessed inputs of `(x, y)` batches as one numpy batch."""
    xs = [_numpy_batch(x) for x, _ in batches]
    if isinstance(xs[0], dict):
        return {k: np.concatenate([x[k] for x in xs])[:count] for k in xs[0]}
    return np.concatenate(xs)[:count]


PARITY_SAMPLES = 100
"""Test samples an export must reproduce: a Keras export within 1e-4 (absolute) + 1e-3
(relative), the TensorRT engine within its FP16 tolerance (`dlpipe.optimize.tensorrt`)."""


def _argmax(logits: list[Any]) -> np.ndarray:
    return np.concatenate([np.asarray(z).argmax(axis=1) for z in logits])


def _start(kind: ParentKind, package: Path, cfg: Any, work: Path, batches: list[Any]) -> _Start:
    if kind == "pytorch":
        from dlpipe.tracking.package import load_torch_model

        net = load_torch_model(package)
        optimizer = ModelOptimizer(
            net, model_name=cfg.model.name, preprocessing=cfg.preprocessing, work_dir=work,
            opset=cfg.optimize.opset,
        )  # fmt: skip
        return _Start(optimizer, predictions(net, batches), kind=kind)
    if kind == "onnx":
        from dlpipe.tracking.package import ONNX_FILE

        fp32 = package / ONNX_FILE
        optimizer = ModelOptimizer.from_onnx(fp32, preprocessing=cfg.preprocessing, work_dir=work)
        return _Start(optimizer, predictions(fp32, batches), kind=kind)
    from dlpipe.models.keras_runner import keras_predict
    from dlpipe.optimize import tf_export
    from dlpipe.tracking.package import KERAS_FILE

    # The parent's own predictions: Keras in a TensorFlow subprocess, never in this one; the
    # process that exports computes them too.
    inputs = [_numpy_batch(x) for x, _ in batches]
    try:
        exported, logits = tf_export.export_and_predict(
            package, work / "model.fp32.onnx", [first_samples(batches, PARITY_SAMPLES)], inputs,
            opset=cfg.optimize.opset,
        )  # fmt: skip
    except ExportError as err:  # ParityError too: every ONNX variant fails with this reason
        logits = keras_predict(package / KERAS_FILE, inputs)
        return _Start(None, _argmax(logits), export_error=err, kind=kind)
    keras_pred = _argmax(logits)
    optimizer = ModelOptimizer.from_onnx(
        exported.path, preprocessing=cfg.preprocessing, work_dir=work, export_result=exported
    )
    return _Start(optimizer, keras_pred, kind=kind)


@dataclass
class _Context:
    name: str
    parent: Any
    cfg: Any
    registry: Any
    register: bool
    max_drop: float
    test_batches: list[Any]
    original_pred: np.ndarray
    measure: bool
    inputs: Any
    work: Path
    progress: Callable[[str, str], None]


def _calibration(datamodule: Any, count: int, batch: int = 32) -> list[Any]:
    raw = datamodule.calibration_samples(count)
    pre = datamodule.preprocessor
    return [pre.preprocess_inference_batch(raw[i : i + batch]) for i in range(0, len(raw), batch)]


def _build_target(
    target: str,
    optimizer: ModelOptimizer | None,
    ctx: _Context,
    datamodule: Any,
    calibration_samples: int | None,
    start: _Start,
) -> VariantResult:
    precision = PRECISION[target]
    details: dict[str, Any] = {}
    ctx.progress(target, "build")
    if target == "pruned" and start.kind != "pytorch":
        return VariantResult(target, "skipped", precision, reason="needs PyTorch weights")
    if target == "onnx" and start.kind == "onnx":
        reason = f"the parent (version {ctx.parent.version}) already is this ONNX graph"
        return VariantResult(target, "skipped", precision, reason=reason)
    if optimizer is None:
        assert start.export_error is not None
        reason = f"no FP32 ONNX graph to start from: {start.export_error}"
        return VariantResult(target, "failed", precision, reason=reason)
    if target == "tensorrt":
        return _tensorrt_variant(optimizer, ctx)
    if target == "onnx":
        path = optimizer.fp32_onnx()
        assert optimizer.export_result is not None
        details = {"max_abs_diff": optimizer.export_result.max_abs_diff,
                   "exporter": optimizer.export_result.exporter}  # fmt: skip
    elif target == "pruned":
        path, details = _pruned_onnx(optimizer, ctx, datamodule)
    else:
        calib = None
        if target == "int8" and not optimizer.is_text:
            count = calibration_samples or ctx.cfg.optimize.calibration_samples
            calib = _calibration(datamodule, count)
        result = optimizer.quantize(precision, calibration_inputs=calib)
        path, details = result.path, dict(result.settings)
    return _evaluate_and_register(ctx, target, precision, path, path, ctx.test_batches, details)


def _evaluate_and_register(
    ctx: _Context,
    target: str,
    precision: str,
    path: Path,
    model: Any,
    batches: list[Any],
    details: dict[str, Any],
    framework: str = "onnx",
) -> VariantResult:
    """Evaluate `model` (an ONNX file or a session over `path`) on `batches`, time it, gate it,
    and register `path`'s package when the gate passes."""
    ctx.progress(target, "evaluate")
    report = validate_accuracy(None, model, batches, original_predictions=ctx.original_pred)
    variant = VariantResult(
        target, "kept", precision, size_mb=onnx_size_mb(path),
        accuracy=report.optimized_accuracy, drop=report.drop, details=details,
    )  # fmt: skip
    variant.details["agreement"] = report.agreement
    if ctx.measure:
        ctx.progress(target, "time")
        variant.latency = measure_latency(model, ctx.inputs)
    try:
        check_accuracy_gate(report, ctx.max_drop)
    except AccuracyDegradationError as err:
        variant.status, variant.reason = "refused", str(err)
        return variant
    if ctx.register:
        ctx.progress(target, "register")
        variant.version = _register(ctx, target, precision, path, variant, framework)
    return variant


def _tensorrt_variant(optimizer: ModelOptimizer, ctx: _Context) -> VariantResult:
    """The parent's FP32 graph on ONNX Runtime's TensorRT provider (FP16), its engine cached in
    the package: parity-checked against the FP32 graph on CPU, gated and timed on TensorRT."""
    from dlpipe.optimize.tensorrt import (
        TensorRTUnavailable,
        build_engine_cache,
        check_fp16_parity,
        stage_tensorrt_package,
        tensorrt_ep_unavailable_reason,
    )
    from dlpipe.tracking.package import ONNX_FILE
    from dlpipe.tracking.tensorrt_ep import ENGINE_CACHE_DIR

    target, precision = "tensorrt", PRECISION["tensorrt"]
    reason = tensorrt_ep_unavailable_reason()
    if reason is not None:
        log.info(reason)
        return VariantResult(target, "skipped", precision, reason=reason)
    source = optimizer.fp32_onnx()
    graph = make_session(source)
    examples = optimizer.example_inputs(1)
    sample_shapes = {
        i.name: tuple(x.shape[1:]) for i, x in zip(graph.get_inputs(), examples, strict=True)
    }
    batch_axes = {i.shape[0] for i in graph.get_inputs()}
    fixed = next(iter(batch_axes)) if len(batch_axes) == 1 else None
    fixed_batch = fixed if isinstance(fixed, int) and fixed > 0 else None
    package_dir = ctx.work / f"package-{target}"
    settings = stage_tensorrt_package(source, package_dir, sample_shapes, fixed_batch=fixed_batch)
    try:
        built = build_engine_cache(package_dir, settings)
    except TensorRTUnavailable as err:
        return VariantResult(target, "skipped", precision, reason=str(err))
    except Exception as err:  # TensorRT's parser and builder errors come as several types
        raise ExportError(f"tensorrt engine build failed: {_first_line(err)}") from err
    samples = first_samples(ctx.test_batches, PARITY_SAMPLES)
    max_diff = check_fp16_parity(built.session, source, samples, settings.max_batch)
    cache = package_dir / ENGINE_CACHE_DIR
    cache_mb = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6
    details: dict[str, Any] = {
        "providers": ",".join(built.providers),
        "engine_build_s": round(built.build_s, 3),
        "engine_cache_mb": round(cache_mb, 4),
        "max_abs_diff": max_diff,
        "parity_samples": len(_sample_arrays(samples)[0]),
        "profile_max_batch": settings.max_batch,
        **{f"built_with_{k}": v for k, v in settings.built_with.items()},
    }
    batches = _rebatch(ctx.test_batches, settings.max_batch)  # never outside the profile
    return _evaluate_and_register(
        ctx, target, precision, package_dir / ONNX_FILE, built.session, batches, details,
        framework="tensorrt",
    )  # fmt: skip


def _rebatch(batches: list[Any], size: int) -> list[Any]:
    """The same `(x, y)` samples in order, in batches of at most `size`."""
    out = []
    for x, y in batches:
        for i in range(0, len(y), size):
            part = (
                {k: v[i : i + size] for k, v in x.items()}
                if isinstance(x, dict)
                else x[i : i + size]
            )
            out.append((part, y[i : i + size]))
    return out


def _sample_arrays(samples: Any) -> list[Any]:
    return list(samples.values()) if isinstance(samples, dict) else [samples]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _pruned_onnx(
    optimizer: ModelOptimizer, ctx: _Context, datamodule: Any
) -> tuple[Path, dict[str, Any]]:
    opt_cfg = ctx.cfg.optimize
    epochs = opt_cfg.prune_finetune_epochs
    batches = datamodule.train_dataloader() if epochs else None
    pruned, report = optimizer.prune(opt_cfg.prune_sparsity, opt_cfg.prune_method, batches, epochs)
    path = ctx.work / "model.pruned.onnx"
    assert optimizer.model_name and optimizer.preprocessing
    export_architecture(
        pruned, optimizer.model_name, optimizer.preprocessing, path, optimizer.opset
    )
    return path, report.to_dict()


def _log_unregistered(ctx: _Context, results: list[VariantResult]) -> None:
    from dlpipe.tracking.runs import log_variant_run

    for v in results:
        if v.run_id is None:
            v.run_id = log_variant_run(
                ctx.registry, ctx.name, ctx.parent, v.to_dict(), ctx.max_drop
            )


def _register(
    ctx: _Context,
    target: str,
    precision: str,
    path: Path,
    v: VariantResult,
    framework: str = "onnx",
) -> str:
    """Package the variant as an MLflow model and register it from its own child run.

    A file already in `<work>/package-<target>` stays in the package (the TensorRT variant's
    `tensorrt.json` and engine cache); `path` may be that directory's `model.onnx`."""
    from dlpipe.quality.profile import inherit_profile
    from dlpipe.tracking.metadata import ModelMetadata
    from dlpipe.tracking.package import save_model_package
    from dlpipe.tracking.runs import end_variant_run, start_variant_run

    parent = ctx.parent
    details = {"target": target, **v.details}
    if v.latency is not None:
        details.update(p95_ms=v.latency.p95_ms, throughput_per_s=v.latency.throughput_per_s)
    meta = ModelMetadata(
        model_name=ctx.name,
        framework=framework,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        model_size_mb=v.size_mb or onnx_size_mb(path),
        training_date=parent.training_date,
        accuracy_metrics={
            "test/acc": float(v.accuracy or 0.0),
            "test/acc_drop": float(v.drop or 0.0),
            "parent/test/acc": float((v.accuracy or 0.0) + (v.drop or 0.0)),
        },
        preprocessing_config=parent.preprocessing_config,
        parent_version=parent.version,
        latency_ms=v.latency.p50_ms if v.latency else None,
        format_details=details,
    )
    package = save_model_package(ctx.work / f"package-{target}", ctx.cfg, meta, onnx_path=path)
    # Same inputs as its parent: the variant is compared with the parent's drift profile.
    inherit_profile(ctx.registry.get_model(ctx.name, parent.version), package)
    v.run_id = start_variant_run(ctx.registry, ctx.name, parent, v.to_dict(), ctx.max_drop)
    try:
        version = str(
            ctx.registry.register_model(package, meta, run_id=v.run_id, artifact_path="model")
        )
    except BaseException:
        end_variant_run(ctx.registry, v.run_id, {**v.to_dict(), "status": "failed"})
        raise
    end_variant_run(ctx.registry, v.run_id, v.to_dict(), version)
    return version
