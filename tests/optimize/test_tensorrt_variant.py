"""The TensorRT variant (issue 14) on a machine without a GPU: everything up to the engine build.

A briefly trained simple_cnn in a real MLflow sqlite registry, real Fashion-MNIST test images,
real ONNX Runtime sessions. Only the GPU is faked, in two places of `dlpipe.tracking.tensorrt_ep`
that optimize and serving both go through: `available_providers` lists TensorRT and CUDA, and
`create_session` records the providers it is asked for, then runs the graph on ONNX Runtime's
CPU provider and reports the providers asked for as in effect (what ONNX Runtime reports on a
GPU host). What that cannot show (the FP16 engine's own numbers, its build time, latency on a
GPU, the cache being reused after a download) is listed in the README's "TensorRT variant".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dlpipe.serving.engine import InferenceEngine
from dlpipe.tracking import tensorrt_ep
from dlpipe.tracking.tensorrt_ep import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    ENGINE_CACHE_DIR,
    TENSORRT_FILE,
    TRT_PROVIDER,
    Provider,
    TensorRTSettings,
)

NAME = "fmnist_trt_test"
REAL_TRT = TRT_PROVIDER in tensorrt_ep.available_providers()
cpu_only = pytest.mark.skipif(REAL_TRT, reason="ONNX Runtime offers TensorRT here: a GPU host")


@dataclass
class Parent:
    registry: Any
    version: str
    package: Path
    images: np.ndarray
    """40 preprocessed test images (more than the profile's largest batch, 32)."""


@pytest.fixture(scope="module")
def parent(module_mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parent]:
    """simple_cnn trained one epoch on 512 images, registered as version 1 of NAME."""
    from dlpipe.config import load_config
    from dlpipe.data import build_datamodule
    from dlpipe.models import create_model
    from dlpipe.tracking.metadata import ModelMetadata, utc_now
    from dlpipe.tracking.package import save_model_package
    from dlpipe.tracking.registry import ModelRegistry

    root = tmp_path_factory.mktemp("trt-parent")
    config = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist.yaml"
    overrides = ["data.limit_train_samples=512", "data.limit_eval_samples=128"]
    cfg = load_config(config, [*overrides, "training.batch_size=64"])
    datamodule = build_datamodule(cfg)
    torch.manual_seed(0)
    net = create_model("simple_cnn", 10, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for x, y in datamodule.train_dataloader():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    net.eval()
    images = np.concatenate([np.asarray(x) for x, _ in datamodule.test_dataloader()])[:40]
    meta = ModelMetadata(
        model_name=NAME, framework="pytorch", precision="fp32", model_size_mb=0.0,
        training_date=utc_now(), accuracy_metrics={"test/acc": 0.0},
        preprocessing_config=cfg.preprocessing,
    )  # fmt: skip
    package = save_model_package(root / "pkg", cfg, meta, net=net)
    registry = ModelRegistry(module_mlflow_uri, cache_dir=root / "cache")
    version = registry.register_model(package, meta)
    yield Parent(registry, version, package, images.astype(np.float32))


class _OnGpu:
    """A real CPU session that reports the providers it was asked for, as ONNX Runtime does on a
    GPU host; it records each batch size it runs."""

    def __init__(self, session: Any, asked: list[str], batches: list[int]) -> None:
        self.session, self.asked, self.batches = session, asked, batches

    def get_providers(self) -> list[str]:
        return list(self.asked)

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> Any:
        self.batches.append(len(next(iter(feed.values()))))
        return self.session.run(outputs, feed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


@dataclass
class FakeGpu:
    asked: list[list[Provider]]
    """Every `providers=` list a session was created with, in order."""
    batches: list[int]


def _fake_gpu(mp: pytest.MonkeyPatch) -> FakeGpu:
    fake = FakeGpu([], [])
    real = tensorrt_ep.create_session

    def create_session(
        onnx_path: str | Path, providers: Sequence[Provider], sess_options: Any = None
    ) -> Any:
        fake.asked.append(list(providers))
        session = real(onnx_path, [CPU_PROVIDER], sess_options)  # the GPU's stand-in
        return _OnGpu(session, tensorrt_ep.provider_names(providers), fake.batches)

    mp.setattr(
        tensorrt_ep, "available_providers", lambda: [TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]
    )
    mp.setattr(tensorrt_ep, "create_session", create_session)
    return fake


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    return _fake_gpu(monkeypatch)


@dataclass
class Optimized:
    report: Any
    fake: FakeGpu
    work: Path


@pytest.fixture(scope="module")
def optimized(parent: Parent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Optimized]:
    """`optimize_version(..., ["tensorrt"])` with TensorRT "available", registering for real."""
    from dlpipe.optimize.variants import optimize_version

    work = tmp_path_factory.mktemp("trt-work")
    with pytest.MonkeyPatch.context() as mp:
        fake = _fake_gpu(mp)
        report = optimize_version(
            NAME, parent.version, ["tensorrt"], 0.0, registry=parent.registry, work_dir=work
        )
    yield Optimized(report, fake, work)


@cpu_only
def test_without_tensorrt_the_target_is_skipped_in_one_line(parent: Parent) -> None:
    from dlpipe.optimize.variants import optimize_version

    before = {str(v["version"]) for v in parent.registry.list_versions(NAME)}
    report = optimize_version(
        NAME, parent.version, ["tensorrt"], registry=parent.registry, measure=False
    )
    (variant,) = report.variants
    assert variant.status == "skipped" and variant.version is None
    assert variant.reason == (
        "tensorrt skipped: ONNX Runtime offers no TensorrtExecutionProvider here "
        "(needs a CUDA GPU with onnxruntime-gpu and tensorrt-cu12)"
    )
    assert {str(v["version"]) for v in parent.registry.list_versions(NAME)} == before


def test_the_variant_is_built_checked_gated_timed_and_registered(
    parent: Parent, optimized: Optimized
) -> None:
    (variant,) = optimized.report.variants
    assert variant.status == "kept", variant.reason
    assert variant.precision == "fp16" and variant.version is not None
    # The same graph ran on both sides (CPU for the GPU): nothing may differ.
    assert variant.details["max_abs_diff"] <= 1e-5 and variant.details["parity_samples"] == 100
    assert variant.drop == 0.0 and variant.details["agreement"] == 1.0
    assert variant.accuracy == pytest.approx(optimized.report.baseline_accuracy)
    assert variant.latency is not None and variant.latency.p50_ms > 0
    assert variant.latency.batch_size == 32 and variant.latency.throughput_per_s > 0
    assert variant.details["providers"] == f"{TRT_PROVIDER},{CUDA_PROVIDER},{CPU_PROVIDER}"

    # One TensorRT session (the engine build), and every run on it stayed within the profile.
    (providers,) = optimized.fake.asked
    trt, *rest = providers
    assert rest == [CUDA_PROVIDER, CPU_PROVIDER] and isinstance(trt, tuple)
    name, options = trt
    staged = optimized.work / "package-tensorrt"
    assert name == TRT_PROVIDER
    assert options == {
        "trt_fp16_enable": True,
        "trt_max_workspace_size": 2 * 1024**3,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str((staged / ENGINE_CACHE_DIR).resolve()),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str((staged / ENGINE_CACHE_DIR).resolve()),
        "trt_profile_min_shapes": "input:1x1x28x28",
        "trt_profile_opt_shapes": "input:16x1x28x28",
        "trt_profile_max_shapes": "input:32x1x28x28",
    }
    assert optimized.fake.batches[:3] == [1, 16, 32]  # the build: min, opt, max
    assert max(optimized.fake.batches) == 32  # parity (100 samples) ran in slices of 32

    registry = parent.registry
    meta = registry.get_metadata(NAME, variant.version)
    assert (meta.framework, meta.precision) == ("tensorrt", "fp16")
    assert meta.parent_version == parent.version
    assert meta.latency_ms == pytest.approx(variant.latency.p50_ms)
    assert meta.format_details["target"] == "tensorrt"
    assert meta.format_details["p95_ms"] == pytest.approx(variant.latency.p95_ms)
    package = Path(registry.get_model(NAME, variant.version))
    assert (package / "model.onnx").is_file() and (package / ENGINE_CACHE_DIR).is_dir()
    settings = TensorRTSettings.from_json((package / TENSORRT_FILE).read_text())
    assert settings.fp16 and settings.engine_cache and settings.max_batch == 32
    assert settings.opt_shapes == {"input": [16, 1, 28, 28]}
    assert settings.built_with["onnxruntime"]

    run = registry.client.get_run(variant.run_id)
    assert run.data.tags["dlpipe.status"] == "kept" and run.data.params["precision"] == "fp16"
    assert run.data.metrics["latency_p95_ms"] == pytest.approx(variant.latency.p95_ms)


@cpu_only
def test_served_on_cpu_it_answers_as_the_parent_and_says_so(
    parent: Parent, optimized: Optimized, caplog: pytest.LogCaptureFixture
) -> None:
    (variant,) = optimized.report.variants
    package = Path(parent.registry.get_model(NAME, variant.version))
    reference = InferenceEngine(parent.package, "cpu").predict_batch(parent.images)  # PyTorch
    with caplog.at_level(logging.WARNING, logger="dlpipe.serving.engine"):
        engine = InferenceEngine(package, "auto")
    warnings = [r.getMessage() for r in caplog.records if "TensorRT variant" in r.getMessage()]
    assert len(warnings) == 1
    assert f"ONNX Runtime offers no {TRT_PROVIDER}" in warnings[0]
    assert warnings[0].endswith(f"serving its FP32 graph on {CPU_PROVIDER}")
    info = engine.get_model_info()
    assert info["providers"] == [CPU_PROVIDER]
    assert (info["framework"], info["precision"]) == ("onnx", "fp32")  # what actually runs
    logits = engine.predict_batch(parent.images)
    np.testing.assert_array_equal(logits.argmax(1), reference.argmax(1))
    np.testing.assert_allclose(logits, reference, rtol=1e-3, atol=1e-4)


def test_served_with_tensorrt_it_asks_for_the_package_engine_cache(
    parent: Parent, optimized: Optimized, fake_gpu: FakeGpu, caplog: pytest.LogCaptureFixture
) -> None:
    (variant,) = optimized.report.variants
    package = Path(parent.registry.get_model(NAME, variant.version))
    with caplog.at_level(logging.WARNING, logger="dlpipe.serving.engine"):
        engine = InferenceEngine(package, "auto")
    assert not [r for r in caplog.records if "TensorRT variant" in r.getMessage()]
    (providers,) = fake_gpu.asked
    trt, *rest = providers
    assert isinstance(trt, tuple) and rest == [CUDA_PROVIDER, CPU_PROVIDER]
    name, options = trt
    assert name == TRT_PROVIDER
    cache = str((package / ENGINE_CACHE_DIR).resolve())
    assert options["trt_engine_cache_path"] == cache and options["trt_timing_cache_path"] == cache
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_enable"] is True
    assert options["trt_profile_max_shapes"] == "input:32x1x28x28"
    info = engine.get_model_info()
    assert (info["framework"], info["precision"]) == ("tensorrt", "fp16")
    assert info["providers"] == [TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]

    # 40 images: beyond the profile's 32, so the engine runs them as 32 + 8 (no rebuild).
    logits = engine.predict_batch(parent.images)
    assert fake_gpu.batches == [32, 8]
    expected = InferenceEngine(parent.package, "cpu").predict_batch(parent.images)
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)

    # device=cpu keeps a TensorRT variant off the GPU, even where TensorRT is offered.
    with caplog.at_level(logging.WARNING, logger="dlpipe.serving.engine"):
        on_cpu = InferenceEngine(package, "cpu")
    assert fake_gpu.asked[-1] == [CPU_PROVIDER]
    assert on_cpu.get_model_info()["precision"] == "fp32"
    assert any("device='cpu'" in r.getMessage() for r in caplog.records)


def test_settings_round_trip_and_profile_shapes(tmp_path: Path) -> None:
    text = TensorRTSettings.for_inputs({"input_ids": (128,), "attention_mask": (128,)}, 8)
    assert text.min_shapes == {"input_ids": [1, 128], "attention_mask": [1, 128]}
    assert text.opt_shapes["input_ids"] == [4, 128] and text.max_batch == 8
    options = tensorrt_ep.provider_options(tmp_path, text)
    assert options["trt_profile_max_shapes"] == "input_ids:8x128,attention_mask:8x128"
    fixed = TensorRTSettings.for_inputs({"input": (3, 32, 32)}, 32, fixed_batch=4)
    assert fixed.min_shapes == fixed.max_shapes == {"input": [4, 3, 32, 32]}
    fixed.save(tmp_path)
    assert tensorrt_ep.load_settings(tmp_path) == fixed and (tmp_path / ENGINE_CACHE_DIR).is_dir()
    assert tensorrt_ep.load_settings(tmp_path / "elsewhere") is None
    with pytest.raises(ValueError, match="max_batch"):
        TensorRTSettings.for_inputs({"input": (1,)}, 0)


def test_parity_refuses_an_engine_beyond_the_fp16_tolerance(
    tmp_path: Path, mlp_factory: Any
) -> None:
    from dlpipe.optimize.onnx_export import ParityError, export_onnx, make_session
    from dlpipe.optimize.tensorrt import check_fp16_parity

    net = mlp_factory([6, 8, 3], 0)
    onnx_file = export_onnx(
        net, (torch.randn(2, 6),), tmp_path / "mlp.onnx", ["input"], exporter="torchscript"
    ).path
    samples = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    exact = make_session(onnx_file)
    assert check_fp16_parity(exact, onnx_file, samples, max_batch=32) == 0.0

    class Shifted:  # an "engine" whose logits are all 1.0 off
        def get_inputs(self) -> Any:
            return exact.get_inputs()

        def run(self, outputs: Any, feed: Any) -> list[np.ndarray]:
            return [exact.run(outputs, feed)[0] + 1.0]

    with pytest.raises(ParityError, match="on the first 50 test samples"):
        check_fp16_parity(Shifted(), onnx_file, samples)
