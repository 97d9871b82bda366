"""ONNX export with a parity check: export, `onnx.checker`, then ORT vs PyTorch on random inputs.

    result = export_onnx(net, (torch.randn(2, 1, 28, 28),), "model.onnx", ["input"])
    result.max_abs_diff  # measured on fresh random inputs, not the export example

The dynamo exporter (torch.export + onnxscript) is tried first: with torch 2.14 it handles what
the TorchScript exporter refuses (e.g. adaptive pooling to a non-divisor size). The TorchScript
exporter is the fallback. When both fail, `ExportError` lists the unsupported operators and the
PyTorch model is left as it was, so callers can keep serving it (design: fallback to PyTorch).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

if TYPE_CHECKING:
    from dlpipe.config import PreprocessingConfig

log = logging.getLogger(__name__)

Exporter = Literal["auto", "dynamo", "torchscript"]
# ONNX protobufs cannot exceed 2 GB; beyond that weights must live in a side file.
_PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2


class ExportError(RuntimeError):
    """ONNX export failed; `unsupported_ops` names the operators no exporter could translate."""

    def __init__(self, message: str, unsupported_ops: Sequence[str] = ()):
        self.unsupported_ops = sorted(set(unsupported_ops))
        if self.unsupported_ops:
            message = f"{message} (unsupported operators: {', '.join(self.unsupported_ops)})"
        super().__init__(message)


class ParityError(ExportError):
    """The exported graph runs but its outputs differ from PyTorch beyond the tolerance."""


@dataclass
class ExportResult:
    """What an export produced and how closely ONNX Runtime matches PyTorch."""

    path: Path
    exporter: str
    opset: int
    input_names: list[str]
    max_abs_diff: float
    size_mb: float


_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.:]+)'"),
    re.compile(r"operator with unrecognized namespace ([\w.:]+)"),
    re.compile(r"[Ee]xporting the operator '?([\w.:]+)'? to ONNX"),
    re.compile(r"ONNX export of operator ([\w.:]+)"),
    re.compile(r"No ONNX function found for ([\w.:]+)"),
)


def unsupported_ops_from_error(err: BaseException) -> list[str]:
    """Operator names mentioned by an exporter error (and the errors it was raised from)."""
    found: set[str] = set()
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        for pattern in _OP_PATTERNS:
            found.update(m.group(1).rstrip(".,") for m in pattern.finditer(text))
        current = current.__cause__ or current.__context__
    return sorted(found)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The dynamo exporter prints progress lines and warns about every traced detail.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def _export_once(
    net: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
    dynamo: bool,
) -> None:
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            net,
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=dynamo,
            external_data=not dynamo,
        )


def strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop per-node debug info (stack traces with local paths, FX node dumps, doc strings).

    The dynamo exporter stores several hundred bytes of it per node; it is useless to serving
    and would leak local file paths into registered artifacts.
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model.graph.doc_string = ""


def _save_self_contained(path: Path) -> None:
    """Rewrite the file with every weight inside it when it fits in one protobuf (< 2 GB)."""
    model = onnx.load(str(path), load_external_data=True)
    strip_debug_metadata(model)
    side_files = {
        entry.value
        for init in model.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }
    if model.ByteSize() < _PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=False)
        for name in side_files:
            (path.parent / name).unlink(missing_ok=True)
    else:  # too large for one protobuf: keep one side file beside the graph
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")


def run_onnx(session: object, names: Sequence[str], args: Sequence[torch.Tensor]) -> np.ndarray:
    """Run an ONNX Runtime session on torch tensors; returns the first output."""
    feeds = {name: a.detach().cpu().numpy() for name, a in zip(names, args, strict=True)}
    return np.asarray(session.run(None, feeds)[0])  # type: ignore[attr-defined]


def make_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session with every graph optimization on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(
    net: nn.Module,
    onnx_path: str | Path,
    inputs: Sequence[tuple[torch.Tensor, ...]],
    input_names: Sequence[str],
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> float:
    """Largest |ORT - PyTorch| over `inputs`; raises `ParityError` beyond atol + rtol*|torch|."""
    session = make_session(onnx_path)
    worst = 0.0
    with _eval_mode(net), torch.no_grad():
        for args in inputs:
            expected = net(*args).detach().cpu().numpy()
            got = run_onnx(session, input_names, args)
            if got.shape != expected.shape:
                raise ParityError(f"ONNX output shape {got.shape} != PyTorch {expected.shape}")
            diff = np.abs(got - expected)
            worst = max(worst, float(diff.max(initial=0.0)))
            if not np.all(diff <= atol + rtol * np.abs(expected)):
                raise ParityError(
                    f"ONNX Runtime differs from PyTorch by up to {worst:.3g} "
                    f"(tolerance atol={atol}, rtol={rtol})"
                )
    return worst


def _random_like(args: tuple[torch.Tensor, ...], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Fresh inputs shaped like `args` with another batch size (ints keep their value range)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for a in args:
        shape = (batch, *a.shape[1:])
        if a.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen, dtype=a.dtype))
        elif bool((a <= 1).all() and (a >= 0).all()):  # masks stay masks
            out.append(torch.ones(shape, dtype=a.dtype))
        else:
            hi = max(int(a.max()) + 1, 2)
            out.append(torch.randint(1, hi, shape, generator=gen, dtype=a.dtype))
    return tuple(out)


def export_onnx(
    net: nn.Module,
    example_args: tuple[torch.Tensor, ...],
    output_path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str] = ("logits",),
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = 18,
    exporter: Exporter = "auto",
    atol: float = 1e-4,
    rtol: float = 1e-3,
    parity_inputs: Sequence[tuple[torch.Tensor, ...]] | None = None,
) -> ExportResult:
    """Export `net`, validate it with `onnx.checker`, and check ORT/PyTorch parity.

    Args:
        example_args: inputs in forward order; use a batch of 2 or more so the batch axis
            stays symbolic.
        dynamic_axes: per input/output name, axis -> symbol; default: axis 0 is `batch`.
        exporter: `auto` tries dynamo, then TorchScript.
        parity_inputs: inputs for the parity check; default: two random batches (sizes 1 and 3).

    Raises:
        ExportError: no exporter produced a valid graph (lists the unsupported operators).
        ParityError: ORT outputs differ from PyTorch beyond `atol + rtol * |expected|`.
    """
    final = Path(output_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    names = list(input_names)
    if len(names) != len(example_args):
        raise ValueError(f"{len(example_args)} example inputs but input_names={names}")
    axes = dynamic_axes or {n: {0: "batch"} for n in [*names, *output_names]}
    order = {"auto": [True, False], "dynamo": [True], "torchscript": [False]}[exporter]
    errors: list[BaseException] = []
    used = ""
    # Everything happens in a staging folder; a file already at output_path is replaced only
    # by a graph that passed the checker and the parity check.
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".export-") as staging:
        path = Path(staging) / final.name
        with _eval_mode(net):
            for dynamo in order:
                try:
                    _export_once(net, example_args, path, names, output_names, axes, opset, dynamo)
                    onnx.checker.check_model(str(path), full_check=True)
                except Exception as err:  # the exporters raise many types; all mean "failed"
                    log.info("%s export failed: %s", "dynamo" if dynamo else "torchscript", err)
                    errors.append(err)
                    continue
                used = "dynamo" if dynamo else "torchscript"
                break
        if not used:
            ops = [op for err in errors for op in unsupported_ops_from_error(err)]
            first = str(errors[-1]).strip().splitlines()[0][:300] if errors else "no exporter"
            raise ExportError(f"ONNX export of {type(net).__name__} failed: {first}", ops)
        _save_self_contained(path)
        checks = list(parity_inputs or [])
        if not checks:
            checks = [_random_like(example_args, 1, seed=1), _random_like(example_args, 3, seed=2)]
        diff = check_parity(net, path, checks, names, atol=atol, rtol=rtol)
        publish_onnx(path, final)
    size = sum(
        p.stat().st_size for p in (final, final.with_name(final.name + ".data")) if p.exists()
    )
    return ExportResult(final, used, opset, names, diff, round(size / 1e6, 4))


def publish_onnx(staged: Path, final: Path) -> None:
    """Move a finished ONNX file (and its `.data` side file, if any) to `final` atomically."""
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, final.with_name(final.name + ".data"))
    else:  # a stale side file would not match the new graph
        final.with_name(final.name + ".data").unlink(missing_ok=True)
    os.replace(staged, final)


def export_architecture(
    net: nn.Module,
    model_name: str,
    preprocessing: PreprocessingConfig,
    output_path: str | Path,
    opset: int = 18,
    exporter: Exporter = "auto",
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportResult:
    """Export a network built from the architecture catalogue (`dlpipe.models`, by name) with
    the contract's input/output names and dynamic axes.

    Images get a dynamic batch axis; text gets dynamic batch and sequence axes, and the parity
    check runs on a shorter sequence with padding so both axes are exercised.
    """
    from dlpipe.models import example_inputs, input_names, model_task

    names = input_names(model_name)
    example = example_inputs(model_name, 2, preprocessing)
    if model_task(model_name) == "text_classification":
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        gen = torch.Generator().manual_seed(3)
        length = max(2, example[0].shape[1] // 2)
        ids = torch.randint(1, 1000, (3, length), generator=gen)
        mask = torch.ones(3, length, dtype=torch.long)
        mask[1, length // 2 :] = 0  # padded row
        checks = [(ids, mask), _random_like(example, 1, seed=4)]
    else:
        axes = {n: {0: "batch"} for n in names}
        checks = [_random_like(example, 1, seed=1), _random_like(example, 3, seed=2)]
    axes["logits"] = {0: "batch"}
    return export_onnx(
        net, example, output_path, names, ("logits",), axes, opset, exporter, atol, rtol, checks
    )
