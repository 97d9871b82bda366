"""Design Properties 8, 22, 24 and 25 on a real MLflow sqlite store (one store per module).

Properties 8 and 24 for both frameworks. TensorFlow: one real `train_keras` run on a slice of
Fashion-MNIST registers its Keras package (model.keras) once for the module; each example
checks that registration and registers that package again from a new completed run with the
metadata it draws, as the PyTorch variant does with its package.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from dlpipe.config import PipelineConfig, PreprocessingConfig, load_config
from dlpipe.tracking.metadata import REQUIRED_FIELDS, ModelMetadata
from dlpipe.tracking.package import save_model_package
from dlpipe.tracking.registry import ABTestConfig, ModelRegistry, RegistryError
from dlpipe.training.train import TrainResult
from keras_session import FRAMEWORKS

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ALPHA = 1e-6  # a correct router fails a split check with probability below this

metric_names = st.from_regex(r"[a-z][a-z0-9_]{0,10}(/[a-z0-9_]{1,8})?", fullmatch=True)
image_preprocessing = st.builds(
    lambda h, w, mean, std: PreprocessingConfig(
        task_type="image_classification",
        image_size=(h, w),
        channels=1,
        normalization_mean=[mean],
        normalization_std=[std],
    ),
    st.integers(1, 512),
    st.integers(1, 512),
    st.floats(0, 1),
    st.floats(0.01, 2),
)
text_preprocessing = st.builds(
    lambda length: PreprocessingConfig(
        task_type="text_classification", tokenizer_name="minilm", max_sequence_length=length
    ),
    st.integers(1, 4096),
)


@st.composite
def metadata_strategy(
    draw: st.DrawFn,
    model_name: str | None = None,
    names: tuple[str, ...] | list[str] = ("alpha", "beta-2", "gamma.v1"),
    frameworks: tuple[str, ...] = ("pytorch", "onnx", "tensorrt"),
) -> ModelMetadata:
    """Any complete metadata, optional fields included."""
    return ModelMetadata(
        model_name=model_name or draw(st.sampled_from(names)),
        framework=draw(st.sampled_from(frameworks)),
        precision=draw(st.sampled_from(["fp32", "fp16", "int8"])),
        model_size_mb=draw(st.floats(1e-4, 1e4)),
        training_date=datetime(2020, 1, 1, tzinfo=UTC)
        + timedelta(seconds=draw(st.integers(0, 10**9))),
        accuracy_metrics=draw(
            st.dictionaries(metric_names, st.floats(0, 1), min_size=1, max_size=4)
        ),
        preprocessing_config=draw(st.one_of(image_preprocessing, text_preprocessing)),
        latency_ms=draw(st.none() | st.floats(0.01, 1000)),
        format_details=draw(
            st.dictionaries(st.sampled_from(["opset", "sparsity", "engine"]), st.integers(0, 99))
        ),
    )


@pytest.fixture(scope="module")
def registry(module_mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    uri = module_mlflow_uri
    return ModelRegistry(uri, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, tiny model package (config, preprocessing, metadata, a Linear's weights)."""
    cfg = PipelineConfig()
    meta = ModelMetadata(
        "pkg", "pytorch", "fp32", 0.0, datetime.now(UTC), {"acc": 0.5}, cfg.preprocessing
    )
    return save_model_package(tmp_path_factory.mktemp("pkg"), cfg, meta, net=torch.nn.Linear(4, 2))


KERAS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist_keras.yaml"


@pytest.fixture(scope="module")
def keras_run(
    registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PipelineConfig, TrainResult]:
    """A real tiny `train_keras` run, registered in this module's store."""
    from dlpipe.training.keras_fit import train_keras

    root = tmp_path_factory.mktemp("keras-run")
    cfg = load_config(KERAS_CONFIG, [
        "data.limit_train_samples=256", "data.limit_eval_samples=128", "training.num_epochs=1",
        "training.batch_size=64", f"training.checkpoint_dir={root}",
        "tracking.registered_model_name=keras-registered",
    ])  # fmt: skip
    return cfg, train_keras(cfg)


def package_for(framework: str, request: pytest.FixtureRequest) -> tuple[Path, str]:
    """The package an example registers and its model file: the module's PyTorch package, or
    the Keras package a real training run registered."""
    if framework == "tensorflow":
        _, result = request.getfixturevalue("keras_run")
        return Path(result.package_dir or ""), "model.keras"
    return request.getfixturevalue("package"), "weights.pt"


def assert_keras_run_registered(registry: ModelRegistry, keras_run: Any) -> None:
    """Property 8 for the run itself: a version of its own, from that run, holding the
    run's model.keras and config."""
    cfg, result = keras_run
    assert result.model_name == "keras-registered" and result.model_version is not None
    mv = registry.client.get_model_version(result.model_name, result.model_version)
    assert mv.run_id == result.run_id and mv.source.startswith(
        registry.client.get_run(result.run_id).info.artifact_uri
    )
    meta = registry.get_metadata(result.model_name, result.model_version)
    assert (meta.version, meta.framework, meta.source_run_id) == (
        result.model_version, "tensorflow", result.run_id,
    )  # fmt: skip
    local = Path(registry.get_model(result.model_name, result.model_version))
    package = Path(result.package_dir or "")
    assert (local / "model.keras").read_bytes() == (package / "model.keras").read_bytes()
    assert load_config(local / "config.yaml") == cfg


def assert_keras_run_metadata(registry: ModelRegistry, keras_run: Any) -> None:
    """Property 24 for the run itself: its version's metadata is complete and is the run's:
    training date, test metrics, preprocessing (the config's, class names included)."""
    cfg, result = keras_run
    row = next(
        r for r in registry.list_versions(result.model_name) if r["version"] == result.model_version
    )
    meta = registry.get_metadata(result.model_name, result.model_version)
    assert meta.missing_fields() == [] and (meta.framework, meta.precision) == (
        "tensorflow",
        "fp32",
    )
    run = registry.client.get_run(result.run_id)
    started = datetime.fromtimestamp(run.info.start_time / 1000, UTC)
    assert started <= meta.training_date <= datetime.fromtimestamp(run.info.end_time / 1000, UTC)
    assert meta.accuracy_metrics == result.metrics
    assert set(result.metrics) == {"test/loss", "test/acc", "test/f1"}
    assert meta.preprocessing_config == cfg.preprocessing and cfg.preprocessing.class_names
    for field in ("training_date", "accuracy_metrics", "preprocessing_config", *REQUIRED_FIELDS):
        assert row[field] == meta.to_dict()[field]


def _assert_stored(registry: ModelRegistry, meta: ModelMetadata, version: str) -> None:
    """Every field is stored both as its own tag and inside the full-JSON tag."""
    mv = registry.client.get_model_version(meta.model_name, version)
    expected = meta.to_dict()
    assert expected["version"] == version
    stored_json = json.loads(mv.tags["dlpipe.metadata"])
    assert stored_json == expected
    for field, value in expected.items():
        if field == "version":  # the model version's own number, not a tag
            assert str(mv.version) == value
            continue
        tag = mv.tags[f"dlpipe.{field}"]
        assert (tag if isinstance(value, str) else json.loads(tag)) == value, field
    assert registry.get_metadata(meta.model_name, version) == meta


# Feature: deep-learning-pipeline, Property 8: Model registry registration
@pytest.mark.parametrize("framework", FRAMEWORKS)
@SETTINGS
@given(data=st.data())
def test_completed_run_is_registered_with_unique_version_and_metadata(
    request: pytest.FixtureRequest, registry: ModelRegistry, framework: str, data: st.DataObject
) -> None:
    package, model_file = package_for(framework, request)
    if framework == "tensorflow":
        assert_keras_run_registered(registry, request.getfixturevalue("keras_run"))
        meta = data.draw(metadata_strategy(frameworks=("tensorflow",)), label="meta")
    else:
        meta = data.draw(metadata_strategy(), label="meta")
    client = registry.client
    experiment = client.get_experiment_by_name("training") or client.get_experiment(
        client.create_experiment("training")
    )
    assert experiment is not None
    run = client.create_run(experiment.experiment_id)
    client.log_metric(run.info.run_id, "val/acc", 0.9)
    client.set_terminated(run.info.run_id)
    meta.source_run_id = run.info.run_id
    newest_before = _latest_version(registry, meta.model_name)

    version = registry.register_model(package, meta, run_id=run.info.run_id)

    assert int(version) > newest_before and meta.version == version  # never seen before
    mv = client.get_model_version(meta.model_name, version)
    assert mv.run_id == run.info.run_id
    assert mv.source.startswith(run.info.artifact_uri)
    _assert_stored(registry, meta, version)
    local = Path(registry.get_model(meta.model_name, version))
    assert (local / model_file).read_bytes() == (package / model_file).read_bytes()
    assert json.loads((local / "metadata.json").read_text())["version"] == version


# Feature: deep-learning-pipeline, Property 22: Model version uniqueness
@SETTINGS
@given(
    names=st.lists(st.sampled_from(["uniq-a", "uniq-b", "uniq-c"]), min_size=1, max_size=2),
    data=st.data(),
)
def test_version_identifiers_never_collide(
    registry: ModelRegistry, package: Path, names: list[str], data: st.DataObject
) -> None:
    for name in set(names):  # every version of the name ever seen, with the run it came from
        if name not in _SEEN:
            _SEEN[name] = {r["version"]: r["run_id"] for r in _versions_or_empty(registry, name)}
    registered = []
    for name in names:
        meta = data.draw(metadata_strategy(model_name=name))
        version = registry.register_model(package, meta)
        assert version not in _SEEN[name], f"{name} version {version} assigned twice"
        _SEEN[name][version] = str(meta.source_run_id)
        registered.append((name, version, meta))
    # Each identifier still leads to its own upload and metadata: nothing was overwritten.
    for name, version, meta in registered:
        mv = registry.client.get_model_version(name, version)
        assert mv.run_id == meta.source_run_id
        assert registry.get_metadata(name, version).training_date == meta.training_date
    runs = [run for versions in _SEEN.values() for run in versions.values()]
    assert len(runs) == len(set(runs))


_SEEN: dict[str, dict[str, str]] = {}


# Feature: deep-learning-pipeline, Property 24: Model metadata completeness
@pytest.mark.parametrize("framework", FRAMEWORKS)
@SETTINGS
@given(data=st.data(), drop=st.sampled_from(REQUIRED_FIELDS))
def test_registered_versions_store_complete_metadata(
    request: pytest.FixtureRequest,
    registry: ModelRegistry,
    framework: str,
    data: st.DataObject,
    drop: str,
) -> None:
    package, _ = package_for(framework, request)
    names = ["meta-a", "meta-b", "meta-c", "meta-d"]
    if framework == "tensorflow":
        assert_keras_run_metadata(registry, request.getfixturevalue("keras_run"))
        meta = data.draw(metadata_strategy(names=names, frameworks=("tensorflow",)), label="meta")
    else:
        meta = data.draw(metadata_strategy(model_name=None, names=names), label="meta")
    # Incomplete metadata is refused, naming the missing field, and stores nothing.
    incomplete: dict[str, Any] = meta.to_dict()
    incomplete.pop("version")
    incomplete[drop] = None
    newest = _latest_version(registry, meta.model_name)
    with pytest.raises(RegistryError, match=drop):
        registry.register_model(package, incomplete)
    assert _latest_version(registry, meta.model_name) == newest

    version = registry.register_model(package, meta)
    _assert_stored(registry, meta, version)
    row = next(r for r in registry.list_versions(meta.model_name) if r["version"] == version)
    for field in ("training_date", "accuracy_metrics", "preprocessing_config", *REQUIRED_FIELDS):
        assert row[field] == meta.to_dict()[field]


@pytest.fixture(scope="module")
def ab_model(registry: ModelRegistry, package: Path) -> tuple[str, str, str]:
    meta = ModelMetadata(
        "ab-model", "onnx", "int8", 0.01, datetime.now(UTC), {"acc": 0.8}, PreprocessingConfig()
    )
    first = registry.register_model(package, meta)
    second = registry.register_model(package, meta)
    return "ab-model", first, second


# Feature: deep-learning-pipeline, Property 25: A/B testing traffic distribution
@SETTINGS
@given(
    # Six decimals: scipy's binomtest overflows for splits near 1e-308.
    split=st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0, 1).map(lambda x: round(x, 6))),
    swap=st.booleans(),
    salt=st.integers(0, 10**9),
)
def test_ab_traffic_converges_to_configured_split(
    registry: ModelRegistry, ab_model: tuple[str, str, str], split: float, swap: bool, salt: int
) -> None:
    name, a, b = ab_model
    if swap:
        a, b = b, a
    registry.set_ab_config(name, ABTestConfig(a, b, split))
    n = 4000
    random_draws = [registry.get_model_for_request(name) for _ in range(n)]
    keyed_draws = [registry.get_model_for_request(name, f"user-{salt}-{i}") for i in range(n)]
    for draws in (random_draws, keyed_draws):
        assert set(draws) <= {a, b}
        hits = draws.count(a)
        # Exact two-sided binomial test: reject only what a correct router shows with p < 1e-6.
        assert binomtest(hits, n, split).pvalue >= ALPHA, (hits, n, split)
    # Sticky: the same key keeps its version.
    for i in range(0, n, 200):
        key = f"user-{salt}-{i}"
        assert registry.get_model_for_request(name, key) == keyed_draws[i]


def _versions_or_empty(registry: ModelRegistry, name: str) -> list[dict[str, Any]]:
    try:
        return registry.list_versions(name)
    except RegistryError:
        return []


def _latest_version(registry: ModelRegistry, name: str) -> int:
    """Highest version number of `name` (0 when there is none), in one small query."""
    found = registry.client.search_model_versions(
        f"name='{name}'", max_results=1, order_by=["version_number DESC"]
    )
    return int(found[0].version) if found else 0
