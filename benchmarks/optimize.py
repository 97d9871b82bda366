"""Optimization benchmark: size, accuracy and speed of every variant against PyTorch eager FP32.

    python benchmarks/optimize.py                          # Fashion-MNIST (trains one) + ResNet-50
    python benchmarks/optimize.py --model fashion_mnist_cnn@champion --registry-uri sqlite:///mlflow.db
    python benchmarks/optimize.py --skip-fashion --ablation   # ResNet-50 INT8, step by step

Fashion-MNIST: a registered model (or one trained here with `dlpipe.training.train` into a
temporary MLflow store) goes through `optimize_version`: accuracy on the real test split,
p50/p95 latency at batch 1, throughput at batch 32. ResNet-50 (224x224, random init: speed and
size only) is exported, quantized and timed in the same process as its PyTorch eager baseline.
Run it on an otherwise idle machine; `--threads` sets both torch and ONNX Runtime threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
Row = dict[str, Any]


def _row(
    model: str, variant: str, precision: str, size: float | None, stats: Any, **extra: Any
) -> Row:
    return {
        "model": model, "variant": variant, "precision": precision, "size_mb": size,
        "p50_ms": stats.p50_ms if stats else None, "p95_ms": stats.p95_ms if stats else None,
        "min_ms": stats.min_ms if stats else None,
        "throughput_b32": stats.throughput_per_s if stats else None, **extra,
    }  # fmt: skip


def bench_fashion(args: argparse.Namespace) -> list[Row]:
    """Variants of the default Fashion-MNIST model, gated on the real test split."""
    from dlpipe.optimize.cli import parse_model_ref
    from dlpipe.optimize.variants import optimize_version
    from dlpipe.tracking.registry import ModelRegistry

    if args.model:
        name, version = parse_model_ref(args.model)
        uri = args.registry_uri
    else:
        tmp = Path(tempfile.mkdtemp(prefix="dlpipe-bench-opt-"))
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri)
        os.environ.setdefault("DLPIPE_MODEL_CACHE", str(tmp / "cache"))
        os.chdir(tmp)
        from dlpipe.config import load_config
        from dlpipe.training.train import train

        overrides = [f"training.checkpoint_dir={tmp / 'ckpt'}", "training.progress_bar=false"]
        if args.epochs:
            overrides.append(f"training.num_epochs={args.epochs}")
        if args.limit_train_samples:
            overrides.append(f"data.limit_train_samples={args.limit_train_samples}")
        cfg = load_config(REPO / "configs" / "fashion_mnist.yaml", overrides)
        start = time.time()
        result = train(cfg)
        print(f"trained {result.model_name} v{result.model_version} in {time.time() - start:.0f}s")
        name, version = result.model_name, result.model_version
    report = optimize_version(
        name, version, ["onnx", "int8", "fp16", "pruned"], args.max_accuracy_drop,
        registry=ModelRegistry(uri), register=not args.dry_run,
    )  # fmt: skip
    model = f"{name} v{report.parent_version}"
    base = report.baseline_latency
    rows = [_row(model, "pytorch eager", "fp32", report.baseline_size_mb, base,
                 accuracy=report.baseline_accuracy, drop=0.0)]  # fmt: skip
    for v in report.variants:
        extra = {"accuracy": v.accuracy, "drop": v.drop, "status": v.status, "version": v.version}
        if v.target == "pruned":
            extra["sparsity"] = v.details.get("sparsity")
        if v.latency and base:
            extra["speedup"] = base.p50_ms / v.latency.p50_ms
        rows.append(_row(model, f"ort {v.target}", v.precision, v.size_mb, v.latency, **extra))
    return rows


def _resnet50(args: argparse.Namespace, work: Path) -> tuple[Any, Any, list[np.ndarray]]:
    from dlpipe.config import PreprocessingConfig
    from dlpipe.models import create_model
    from dlpipe.optimize.optimizer import ModelOptimizer

    torch.manual_seed(0)
    net = create_model("resnet50", 1000, 3).eval()
    pre = PreprocessingConfig(
        image_size=(224, 224), channels=3, normalization_mean=[0.485, 0.456, 0.406],
        normalization_std=[0.229, 0.224, 0.225],
    )  # fmt: skip
    opt = ModelOptimizer(net, model_name="resnet50", preprocessing=pre, work_dir=work)
    rng = np.random.default_rng(0)  # random init: calibration data only sets ranges
    calib = [rng.standard_normal((8, 3, 224, 224)).astype(np.float32) for _ in range(4)]
    return net, opt, calib


def bench_resnet50(args: argparse.Namespace, work: Path) -> list[Row]:
    """ResNet-50 224x224: PyTorch eager vs ORT FP32 / INT8 static / FP16."""
    from dlpipe.optimize.latency import measure_latency

    net, opt, calib = _resnet50(args, work)
    start = time.time()
    fp32 = opt.export_onnx(work / "resnet50.fp32.onnx")
    print(f"resnet50: exported in {time.time() - start:.0f}s, parity {fp32.max_abs_diff:.2e}")
    start = time.time()
    int8 = opt.quantize("int8", calibration_inputs=calib)
    print(f"resnet50: static INT8 in {time.time() - start:.0f}s ({int8.settings})")
    fp16 = opt.quantize("fp16")

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 3, 224, 224),)

    timing = {"iterations": args.iterations, "throughput_iterations": 3}
    eager = measure_latency(net, inputs, **timing)
    rows = [_row("resnet50", "pytorch eager", "fp32", round(_param_mb(net), 2), eager)]
    for label, res, precision in (("ort fp32", fp32, "fp32"), ("ort int8", int8, "int8"),
                                  ("ort fp16 (size only on CPU)", fp16, "fp16")):  # fmt: skip
        stats = measure_latency(res.path, inputs, **timing)
        rows.append(_row("resnet50", label, precision, res.size_mb, stats,
                         speedup=eager.p50_ms / stats.p50_ms))  # fmt: skip
    return rows


def _param_mb(net: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in net.state_dict().values()) / 1e6


def ablation(args: argparse.Namespace, work: Path) -> list[Row]:
    """ResNet-50 INT8, one setting at a time, p50 at batch 1 (same process, same threads)."""
    import onnxruntime as ort

    from dlpipe.optimize.latency import measure_latency
    from dlpipe.optimize.quantize import quantize_int8_static, save_ort_optimized

    net, opt, calib = _resnet50(args, work)
    src = opt.fp32_onnx()
    steps: list[tuple[str, dict[str, Any]]] = [
        ("naive: per-tensor, s8 activations, all ops, no pre-processing",
         {"per_channel": False, "activation_type": "int8", "op_types": None, "preprocess": False}),
        ("+ pre-processing (BN folding, shape inference)",
         {"per_channel": False, "activation_type": "int8", "op_types": None}),
        ("+ per-channel weights", {"activation_type": "int8", "op_types": None}),
        ("+ u8 activations (u8s8 VNNI kernels)", {"op_types": None}),
        ("+ op selection (default: conv, gemm, add, pools, ...)", {}),
        ("  variant: QOperator format", {"quant_format": "qoperator"}),
        ("  variant: reduce_range", {"reduce_range": True}),
        ("  variant: conv/gemm/matmul only", {"op_types": ("Conv", "Gemm", "MatMul")}),
    ]  # fmt: skip

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 3, 224, 224),)

    eager = measure_latency(net, inputs, iterations=args.iterations, throughput_batch=None)
    fp32 = measure_latency(src, inputs, iterations=args.iterations, throughput_batch=None)
    rows = [
        _row("resnet50", "pytorch eager", "fp32", None, eager),
        _row("resnet50", "ort fp32", "fp32", None, fp32, speedup=eager.p50_ms / fp32.p50_ms),
    ]
    default_path = None
    for i, (label, options) in enumerate(steps):
        res = quantize_int8_static(src, work / f"ablation{i}.onnx", calib, **options)
        default_path = res.path if not options else default_path
        stats = measure_latency(res.path, inputs, iterations=args.iterations, throughput_batch=None)
        rows.append(_row("resnet50", label, "int8", res.size_mb, stats,
                         speedup=eager.p50_ms / stats.p50_ms))  # fmt: skip
    assert default_path is not None
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}  # fmt: skip
    for name, level in levels.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(default_path), so, providers=["CPUExecutionProvider"])
        stats = measure_latency(session, inputs, iterations=args.iterations, throughput_batch=None)
        rows.append(_row("resnet50", f"  default int8, session level {name} (others: all)",
                         "int8", None, stats, speedup=eager.p50_ms / stats.p50_ms))  # fmt: skip
    saved = save_ort_optimized(default_path, work / "ablation-ort-optimized.onnx")
    stats = measure_latency(saved, inputs, iterations=args.iterations, throughput_batch=None)
    rows.append(_row("resnet50", "  default int8, ORT-optimized graph saved (extended)", "int8",
                     round(saved.stat().st_size / 1e6, 2), stats,
                     speedup=eager.p50_ms / stats.p50_ms))  # fmt: skip
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    one = ort.InferenceSession(str(default_path), so, providers=["CPUExecutionProvider"])
    stats = measure_latency(one, inputs, iterations=args.iterations, throughput_batch=None)
    rows.append(_row("resnet50", "  default int8, 1 intra-op thread", "int8", None, stats,
                     speedup=eager.p50_ms / stats.p50_ms))  # fmt: skip
    return rows


def print_rows(title: str, rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = ["model", "variant", "precision", "size_mb", "accuracy", "drop", "p50_ms", "p95_ms",
            "min_ms", "throughput_b32", "speedup"]  # fmt: skip
    for c in cols:
        table.add_column(c)
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                v = f"{v * 100:.2f} pts" if c == "drop" else f"{v:.4g}"
            cells.append("-" if v is None else str(v))
        table.add_row(*cells)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="registered NAME[@alias|:version] instead of training one")
    p.add_argument("--registry-uri", default=None)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: config)")
    p.add_argument("--limit-train-samples", type=int, default=None)
    p.add_argument("--max-accuracy-drop", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--skip-fashion", action="store_true")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--ablation", action="store_true", help="ResNet-50 INT8 step by step")
    p.add_argument("--dry-run", action="store_true", help="do not register variants")
    p.add_argument("--json", type=Path, default=None, help="also write all rows to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} cpu={os.cpu_count()} torch={torch.__version__}")
    results: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory(prefix="dlpipe-bench-r50-") as tmp:
        if not args.skip_fashion:
            results["fashion_mnist"] = bench_fashion(args)
            print_rows("Fashion-MNIST (accuracy on the real test split)", results["fashion_mnist"])
        if not args.skip_resnet:
            results["resnet50"] = bench_resnet50(args, Path(tmp))
            print_rows("ResNet-50 224x224 (random init: speed and size)", results["resnet50"])
        if args.ablation:
            results["ablation"] = ablation(args, Path(tmp))
            print_rows("ResNet-50 INT8 step by step (p50 batch 1)", results["ablation"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
