"""`dlpipe import`: register a model trained elsewhere, so it is optimized, promoted and served
like any version dlpipe trained.

    dlpipe import model.keras --name shoes -c configs/fashion_mnist.yaml     # evaluated
    dlpipe import saved_model/ --name shoes -c configs/fashion_mnist.yaml    # a SavedModel dir
    dlpipe import model.pt --name shoes -c configs/fashion_mnist.yaml        # TorchScript
    dlpipe import model.onnx --name shoes --preprocessing preprocessing.json --labels a,b,c

    result = import_model("model.keras", "shoes", cfg=load_config("configs/fashion_mnist.yaml"))

Every imported version holds `model.onnx`, so `dlpipe optimize` and `dlpipe serve` treat it as
they treat any ONNX version:

| format | framework | ONNX graph made by | kept as well |
| --- | --- | --- | --- |
| `.keras` (Keras 3) | tensorflow | tf2onnx (TF subprocess), parity-checked | `model.keras` |
| SavedModel directory | tensorflow | tf2onnx on `serving_default` (TF subprocess), parity | — |
| TorchScript `.pt` | pytorch | `torch.onnx.export` of the ScriptModule, parity | — |
| `.onnx` | onnx | `onnx.checker`, then copied | — |

The model must take what `DataPreprocessor` produces (docs/architecture.md, Models): images as
float32 N×C×H×W normalized by the preprocessing config, text as int64 `input_ids` and
`attention_mask`; and give N×K logits. A one-input model's input is renamed `input` and the
first output `logits` in the graph, as serving names them. A run-through on preprocessed inputs
checks this before anything is registered.

`-c CONFIG` gives the preprocessing, the data and the optimize settings: the model is evaluated
on the config's test split (`test/acc`, `test/loss`, `test/f1`), the parity check runs on its
first 100 test samples, and the config is stored as the package's config.yaml (its `model`
section describes the catalogue model of that config, not the imported network: metadata.json
says what was imported). `--preprocessing FILE` alone registers a version that serves but was
never evaluated: its accuracy_metrics are `{"import/unevaluated": 1.0}` (the registry requires
at least one), it has no config.yaml, and `dlpipe optimize` refuses it (no test split to gate
on). Imported graphs are taken as FP32 (`precision: fp32`).

This process may load torch (the data pipeline, TorchScript); TensorFlow only ever runs in the
`dlpipe.models.keras_runner` subprocess (`import tensorflow` then `import torchvision` crashes).
The module lives at the top of the package, beside `pipeline.py`, because it joins stages:
converting needs `dlpipe.optimize`'s exporters, and `dlpipe.tracking` must not depend on them.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.table import Table

from dlpipe.cli_support import (
    CommandParser,
    Outcome,
    UsageError,
    add_json_flag,
    add_tracking_flag,
    as_usage_error,
    run_command,
)
from dlpipe.config import ConfigError, PipelineConfig, PreprocessingConfig, load_config

SourceFormat = Literal["keras", "saved_model", "torchscript", "onnx"]
FRAMEWORK: dict[SourceFormat, str] = {
    "keras": "tensorflow",
    "saved_model": "tensorflow",
    "torchscript": "pytorch",
    "onnx": "onnx",
}
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".torchscript", ".ts")
PARITY_SAMPLES = 100
UNEVALUATED_METRIC = "import/unevaluated"
"""The one accuracy metric of a version imported without a data config."""


class ImportModelError(RuntimeError):
    """The model could not be converted, checked or registered."""


@dataclass
class ImportResult:
    model_name: str
    version: str
    framework: str
    source_format: str
    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


def detect_format(path: str | Path) -> SourceFormat:
    """What `path` holds, from its name (a directory: a SavedModel).

    Raises:
        UsageError: missing, or not one of the four formats.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise UsageError(f"{p} is a directory without saved_model.pb (not a SavedModel)")
    if not p.is_file():
        raise UsageError(f"{p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".keras":
        return "keras"
    if suffix == ".onnx":
        return "onnx"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    raise UsageError(
        f"{p}: unknown model format {suffix or '(no suffix)'!r}; dlpipe imports .keras, a "
        f"SavedModel directory, .onnx and TorchScript ({', '.join(TORCHSCRIPT_SUFFIXES)})"
    )


def _need_tensorflow(fmt: SourceFormat) -> None:
    """TensorFlow formats need the [tensorflow] extra: say so before any work starts."""
    if fmt in ("keras", "saved_model"):
        for module in ("tensorflow", "tf2onnx"):
            if importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def task_input_names(pre: PreprocessingConfig) -> list[str]:
    from dlpipe.optimize.tf_export import task_input_names as names

    return names(pre.task_type)


# -- conversion ------------------------------------------------------------------------------


def _synthetic_batch(pre: PreprocessingConfig, batch: int = 4) -> Any:
    """Preprocessed-looking inputs when there is no data config: random normalized images, or
    token ids with one padded row."""
    from dlpipe.optimize.tf_export import default_parity_inputs

    names = task_input_names(pre)
    if pre.task_type == "text_classification":
        return default_parity_inputs(names, [pre.max_sequence_length or 16])[1]
    assert pre.image_size is not None
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, pre.channels or 1, *pre.image_size)).astype(np.float32)


def _rename_value(graph: Any, old: str, new: str) -> None:
    """Rename a value everywhere in `graph` and its subgraphs (If/Loop bodies)."""
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                _rename_value(sub, old, new)
    for values in (graph.input, graph.output, graph.value_info):
        for value in values:
            if value.name == old:
                value.name = new


def import_onnx_graph(src: Path, dst: Path, names: list[str]) -> dict[str, Any]:
    """Check an ONNX file and write it to `dst` with serving's input and output names."""
    import onnx

    try:
        onnx.checker.check_model(str(src), full_check=True)
        model = onnx.load(str(src))  # external tensors pulled in, whatever their file is called
    except Exception as err:  # the checker and the loader raise several types
        raise ImportModelError(f"{src} is not a valid ONNX model: {err}") from err
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in weights]
    if len(names) == 1 and len(inputs) == 1:
        if inputs[0] != names[0]:
            _rename_value(graph, inputs[0], names[0])
    elif set(inputs) != set(names):
        raise ImportModelError(f"{src} takes inputs {inputs}; a model for this task takes {names}")
    if not graph.output:
        raise ImportModelError(f"{src} has no outputs")
    if graph.output[0].name != "logits":
        if "logits" in {o.name for o in graph.output}:
            raise ImportModelError(f"{src}: 'logits' must be the first output")
        _rename_value(graph, graph.output[0].name, "logits")
    onnx.checker.check_model(model, full_check=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB ceiling
    onnx.save_model(model, str(dst), save_as_external_data=external, location=dst.name + ".data")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"exporter": "none (ONNX given)", "opset": opset, "max_abs_diff": 0.0}


def _torch_inputs(batch: Any, names: list[str]) -> tuple[Any, ...]:
    import torch

    if isinstance(batch, dict):
        return tuple(torch.from_numpy(np.ascontiguousarray(batch[n])) for n in names)
    return (torch.from_numpy(np.ascontiguousarray(batch)),)


def export_torchscript(
    src: Path, dst: Path, pre: PreprocessingConfig, parity: Any, opset: int
) -> dict[str, Any]:
    """`torch.onnx.export` of a TorchScript module (dynamic batch; text: dynamic sequence),
    checked against the module on `parity`."""
    import torch

    from dlpipe.optimize.onnx_export import export_onnx

    try:
        net = torch.jit.load(str(src), map_location="cpu")
    except Exception as err:  # torch raises RuntimeError for a plain pickle or a state_dict
        raise ImportModelError(
            f"{src} is not a TorchScript file ({err}); save the model with "
            "torch.jit.save(torch.jit.script(model), path) (a state_dict needs its architecture)"
        ) from err
    names = task_input_names(pre)
    text = pre.task_type == "text_classification"
    axes = {n: ({0: "batch", 1: "sequence"} if text else {0: "batch"}) for n in names}
    axes["logits"] = {0: "batch"}
    example = _torch_inputs(parity, names)
    # A batch of 2 keeps the batch axis symbolic in the trace.
    example2 = tuple(torch.cat([a[:1], a[:1]]) for a in example)
    result = export_onnx(
        net, example2, dst, names, ("logits",), axes, opset, exporter="torchscript",
        parity_inputs=[example],
    )  # fmt: skip
    return {"exporter": result.exporter, "opset": opset, "max_abs_diff": result.max_abs_diff}


def export_tensorflow(
    src: Path, dst: Path, pre: PreprocessingConfig, parity: Any, opset: int
) -> dict[str, Any]:
    """tf2onnx on a `.keras` file or a SavedModel directory, in a TensorFlow subprocess."""
    from dlpipe.optimize.tf_export import export_keras

    result = export_keras(src, dst, task_input_names(pre), [parity], opset=opset)
    return {"exporter": result.exporter, "opset": opset, "max_abs_diff": result.max_abs_diff}


def _check_outputs(onnx_path: Path, parity: Any, class_names: list[str] | None) -> int:
    """Run the graph on preprocessed inputs: N×K logits with K >= 2 (and K labels). Returns K."""
    from dlpipe.optimize.onnx_export import make_session

    session = make_session(onnx_path)
    names = [i.name for i in session.get_inputs()]
    feeds = parity if isinstance(parity, dict) else {names[0]: parity}
    try:
        out = np.asarray(session.run(None, {n: feeds[n] for n in names})[0])
    except Exception as err:  # ORT reports shape and type mismatches as several types
        raise ImportModelError(
            f"the model does not take the preprocessed inputs ({err}); it must take what "
            "DataPreprocessor produces (images N×C×H×W float32, text input_ids/attention_mask)"
        ) from err
    n = len(next(iter(feeds.values())))
    if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 2:
        raise ImportModelError(f"the model's output has shape {list(out.shape)}; N×K logits needed")
    classes = int(out.shape[1])
    if class_names and len(class_names) != classes:
        raise ImportModelError(f"{len(class_names)} class names for a model with {classes} outputs")
    return classes


# -- evaluation and registration -------------------------------------------------------------


def evaluate_onnx(onnx_path: Path, batches: list[Any], num_classes: int) -> dict[str, float]:
    """`test/acc`, `test/loss`, `test/f1` of the graph on preprocessed `(x, y)` batches."""
    from dlpipe.optimize.accuracy import predict_logits
    from dlpipe.optimize.onnx_export import make_session
    from dlpipe.training.keras_data import classification_metrics

    session = make_session(onnx_path)
    logits = np.concatenate([predict_logits(session, x) for x, _ in batches])
    labels = np.concatenate([np.asarray(y) for _, y in batches])
    metrics, _ = classification_metrics(logits, labels, num_classes)
    return {f"test/{k}": float(v) for k, v in metrics.items()}


def import_model(
    path: str | Path,
    name: str,
    *,
    cfg: PipelineConfig | None = None,
    preprocessing: PreprocessingConfig | None = None,
    class_names: list[str] | None = None,
    registry: Any = None,
    tracking_uri: str | None = None,
    work_dir: str | Path | None = None,
) -> ImportResult:
    """Convert, check, evaluate (with `cfg`), package and register a model trained elsewhere.

    Args:
        cfg: data, preprocessing and optimize settings; the model is evaluated on its test split.
        preprocessing: instead of `cfg`, only how inputs are prepared (no evaluation).
        class_names: labels to serve (else the preprocessing's, else the data's).
        registry: a `ModelRegistry` (default: one on `tracking_uri`, else MLflow's
            environment), opened only once the model converted and checked.

    Raises:
        UsageError: a missing or unknown file, or neither/both of `cfg` and `preprocessing`.
        ImportModelError: conversion, the parity check or the input check failed.
    """
    from dlpipe.tracking.metadata import ModelMetadata, utc_now
    from dlpipe.tracking.package import save_model_package
    from dlpipe.tracking.registry import ModelRegistry
    from dlpipe.tracking.store import check_name

    source = Path(path)
    fmt = detect_format(source)
    if (cfg is None) == (preprocessing is None):
        raise UsageError("give the data config (-c CONFIG) or the preprocessing (--preprocessing)")
    check_name(name)
    _need_tensorflow(fmt)
    pre = cfg.preprocessing if cfg is not None else preprocessing
    assert pre is not None
    batches: list[Any] = []
    if cfg is not None:
        from dlpipe.data import build_datamodule
        from dlpipe.optimize.variants import first_samples

        datamodule = build_datamodule(cfg)
        batches = list(datamodule.test_dataloader())
        if not batches:
            raise ImportModelError("the config's test split is empty: nothing to evaluate on")
        parity = first_samples(batches, PARITY_SAMPLES)
        class_names = class_names or pre.class_names or list(datamodule.class_names or []) or None
    else:
        parity = _synthetic_batch(pre)
        class_names = class_names or pre.class_names
    if class_names:
        pre = pre.model_copy(update={"class_names": list(class_names)})
    opset = cfg.optimize.opset if cfg is not None else 18

    with tempfile.TemporaryDirectory(prefix="dlpipe-import-") as tmp:
        work = Path(work_dir or tmp)
        onnx_path = work / "model.onnx"
        if fmt == "onnx":
            details = import_onnx_graph(source, onnx_path, task_input_names(pre))
        elif fmt == "torchscript":
            details = export_torchscript(source, onnx_path, pre, parity, opset)
        else:
            details = export_tensorflow(source, onnx_path, pre, parity, opset)
        classes = _check_outputs(onnx_path, parity, pre.class_names)
        if cfg is not None:
            metrics = evaluate_onnx(onnx_path, batches, classes)
            evaluated = f"test split of the config ({sum(len(y) for _, y in batches)} samples)"
        else:
            metrics, evaluated = {UNEVALUATED_METRIC: 1.0}, "not evaluated (no data config)"
        package_cfg = None
        if cfg is not None:
            model = cfg.model.model_copy(update={"num_classes": classes})
            package_cfg = cfg.model_copy(update={"preprocessing": pre, "model": model})
        details = {
            **details,
            "source_format": fmt,
            "imported_from": str(source.resolve()),
            "evaluated_on": evaluated,
        }
        metadata = ModelMetadata(
            model_name=name,
            framework=FRAMEWORK[fmt],  # type: ignore[arg-type]
            precision="fp32",
            model_size_mb=0.0,  # the ONNX graph's, filled by save_model_package
            training_date=utc_now(),  # trained elsewhere, at a time dlpipe cannot know
            accuracy_metrics=metrics,
            preprocessing_config=pre,
            format_details=details,
        )
        package = save_model_package(
            work / "package", package_cfg, metadata, onnx_path=onnx_path,
            keras_path=source if fmt == "keras" else None,
        )  # fmt: skip
        version = _register(registry or ModelRegistry(tracking_uri), package, metadata, metrics)
        return ImportResult(name, version, metadata.framework, fmt, metrics, details)


def _register(registry: Any, package: Path, metadata: Any, metrics: dict[str, float]) -> str:
    """Register from an `import` run that carries the evaluation metrics and the source."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.time import get_current_time_millis

    from dlpipe.tracking.store import retry_locked

    details = metadata.format_details
    run_id = registry.start_run(
        metadata.model_name, "import", tags={"dlpipe.source_format": details["source_format"]}
    )
    metadata.source_run_id = run_id
    now = get_current_time_millis()
    client = registry.client
    params = [Param(k, str(details[k])[:500]) for k in ("source_format", "imported_from")]
    logged = [Metric(k, v, now, 0) for k, v in metrics.items() if k != UNEVALUATED_METRIC]
    try:
        retry_locked(lambda: client.log_batch(run_id, metrics=logged, params=params))
        version = str(
            registry.register_model(package, metadata, run_id=run_id, artifact_path="model")
        )
    except BaseException:
        retry_locked(lambda: client.set_terminated(run_id, status="FAILED"))
        raise
    retry_locked(lambda: client.set_terminated(run_id))
    return str(version)


# -- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="dlpipe import",
        description="Register a model trained elsewhere (.keras, SavedModel directory, .onnx, "
        "TorchScript .pt) so it can be optimized, promoted and served.",
    )
    p.add_argument("path", help="a .keras file, a SavedModel directory, a .onnx or a .pt file")
    p.add_argument("--name", required=True, help="registered model name (new or existing)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "-c", "--config",
        help="data + preprocessing config: evaluated on its test split, optimizable",
    )  # fmt: skip
    source.add_argument(
        "--preprocessing", metavar="FILE",
        help="a preprocessing.json only: serves, but is not evaluated nor optimizable",
    )  # fmt: skip
    p.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help="set a key of the -c config, e.g. -o data.limit_eval_samples=1000",
    )  # fmt: skip
    p.add_argument("--labels", metavar="A,B,...", help="class names, in output order")
    add_tracking_flag(p)
    add_json_flag(p, "the registered version, its metrics and how it was converted")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dlpipe import`; returns the exit status."""
    return run_command(build_parser(), import_job, argv)


def import_job(args: argparse.Namespace) -> Outcome:
    from dlpipe.tracking.store import RegistryError

    cfg = preprocessing = None
    with as_usage_error(ConfigError, RegistryError, ValueError, OSError):
        detect_format(args.path)
        if args.override and not args.config:
            raise UsageError("-o overrides a key of the -c config; give -c CONFIG.yaml")
        if args.config:
            cfg = load_config(args.config, args.override)
        else:
            text = Path(args.preprocessing).read_text()
            preprocessing = PreprocessingConfig.model_validate_json(text)
        from dlpipe.tracking.store import check_name

        check_name(args.name)
    labels = [t.strip() for t in args.labels.split(",") if t.strip()] if args.labels else None
    result = import_model(
        args.path, args.name, cfg=cfg, preprocessing=preprocessing, class_names=labels,
        tracking_uri=args.tracking_uri,
    )  # fmt: skip
    return Outcome(asdict(result), lambda console: _summary(console, result))


def _summary(console: Console, result: ImportResult) -> None:
    table = Table(title="dlpipe import", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    table.add_row("model", f"{result.model_name} v{result.version}")
    table.add_row("framework", f"{result.framework} (from {result.source_format})")
    for key in ("exporter", "max_abs_diff", "opset", "evaluated_on"):
        table.add_row(key.replace("_", " "), str(result.details.get(key)))
    for key, value in sorted(result.metrics.items()):
        table.add_row(key, f"{value:.4f}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
