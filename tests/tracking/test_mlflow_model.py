"""Model packages as MLflow models: MLmodel and flavors, the pyfunc on every raw input form
(checked against numbers computed here by hand), registration of plain packages, context tags
and dataset digests."""

from __future__ import annotations

import base64
import getpass
import io
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.data.numpy_dataset import from_numpy
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from PIL import Image

from dlpipe.config import PipelineConfig
from dlpipe.serving.pyfunc import PackageModel
from dlpipe.tracking.datasets import content_digest, log_datasets
from dlpipe.tracking.metadata import ModelMetadata, utc_now
from dlpipe.tracking.mlflow_model import OUTPUT_COLUMNS
from dlpipe.tracking.package import save_model_package
from dlpipe.tracking.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "data"))
from text_helpers import make_text_package  # noqa: E402

CLASSES = [f"c{i}" for i in range(10)]
MEAN, STD = 0.2860, 0.3530
WEIGHTS = np.random.default_rng(7).standard_normal((784, 10)).astype(np.float32)
BIAS = np.linspace(-0.5, 0.5, 10).astype(np.float32)


def _cfg() -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.preprocessing.class_names = CLASSES
    cfg.preprocessing.normalization_mean = [MEAN]
    cfg.preprocessing.normalization_std = [STD]
    return cfg


def _meta(framework: str) -> ModelMetadata:
    return ModelMetadata(
        model_name="m", framework=framework, precision="fp32",  # type: ignore[arg-type]
        model_size_mb=0.0, training_date=utc_now(), accuracy_metrics={"test/acc": 0.5},
        preprocessing_config=_cfg().preprocessing,
    )  # fmt: skip


def _linear_onnx(path: Path) -> Path:
    """input N×1×28×28 -> logits = flatten(input) @ WEIGHTS + BIAS."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(WEIGHTS, "w"), numpy_helper.from_array(BIAS, "b")]
    graph = helper.make_graph(nodes, "linear", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _expected_probabilities(images: np.ndarray) -> np.ndarray:
    x = (images.reshape(len(images), -1).astype(np.float64) / 255.0 - MEAN) / STD
    logits = x @ WEIGHTS.astype(np.float64) + BIAS
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(z / z.sum(axis=1, keepdims=True))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    onnx_file = _linear_onnx(root / "linear.onnx")
    torch.manual_seed(0)
    from dlpipe.models import create_model

    net = create_model("simple_cnn", 10, 1).eval()
    return {
        "onnx": save_model_package(root / "onnx", _cfg(), _meta("onnx"), onnx_path=onnx_file),
        "torch": save_model_package(root / "torch", _cfg(), _meta("pytorch"), net=net),
        "plain": save_model_package(
            root / "plain", _cfg(), _meta("onnx"), onnx_path=onnx_file, mlflow_model=False
        ),
    }


def test_packages_are_mlflow_models_with_flavors_signature_and_example(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    for kind in ("onnx", "torch"):
        package = packages[kind]
        model = Model.load(str(package / "MLmodel"))
        pyfunc = model.flavors["python_function"]
        assert pyfunc["loader_module"] == "dlpipe.serving.pyfunc" and pyfunc["data"] == "."
        assert model.signature.inputs.input_names() == ["image"]
        assert tuple(model.signature.outputs.input_names()) == OUTPUT_COLUMNS
        assert model.metadata is not None and model.metadata["dlpipe"]["class_names"] == CLASSES
        requirements = (package / "requirements.txt").read_text().splitlines()
        if kind == "onnx":
            assert model.flavors["onnx"]["data"] == "model.onnx"
            assert any(r.startswith("dlpipe[serve]==") for r in requirements)
            assert not any(r.startswith("torch") for r in requirements)
        else:
            assert "onnx" not in model.flavors  # weights.pt is no mlflow.pytorch model
            assert any(r.startswith("dlpipe[serve,train]==") for r in requirements)
            assert any(r.startswith("torch==") for r in requirements)
        # MLflow's own path: score the saved serving example as the scoring server parses it.
        out = tmp_path / f"{kind}.json"
        mlflow.models.predict(
            str(package), input_path=str(package / "serving_input_example.json"),
            output_path=str(out), env_manager="local",
        )  # fmt: skip
        (row,) = json.loads(out.read_text())["predictions"]
        assert set(row) == set(OUTPUT_COLUMNS) and row["label"] in CLASSES
    graph = mlflow.onnx.load_model(str(packages["onnx"]))  # the onnx flavor is genuine
    assert [i.name for i in graph.graph.input] == ["input"]
    assert not (packages["plain"] / "MLmodel").exists()


def test_pyfunc_takes_every_raw_image_form_and_matches_hand_computed_numbers(
    packages: dict[str, Path],
) -> None:
    model = mlflow.pyfunc.load_model(str(packages["onnx"]))
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    pngs = [_png(image) for image in images]
    expected = _expected_probabilities(images)
    reference = model.predict(pd.DataFrame({"image": pngs}))
    assert list(reference.columns) == list(OUTPUT_COLUMNS)
    np.testing.assert_allclose(np.stack(reference["probabilities"]), expected, atol=1e-6)
    top = expected.argmax(axis=1)
    assert list(reference["class_index"]) == top.tolist()
    assert list(reference["label"]) == [CLASSES[i] for i in top]
    np.testing.assert_allclose(reference["probability"], expected.max(axis=1), atol=1e-6)

    forms: dict[str, Any] = {
        "base64 strings": pd.DataFrame({"image": [base64.b64encode(p).decode() for p in pngs]}),
        "H×W arrays": pd.DataFrame({"image": list(images)}),
        "H×W×1 arrays": pd.DataFrame({"image": [i[..., None] for i in images]}),
        "PIL images": pd.DataFrame({"image": [Image.fromarray(i) for i in images]}),
    }
    for form, frame in forms.items():
        got = model.predict(frame)
        np.testing.assert_allclose(
            np.stack(got["probabilities"]), np.stack(reference["probabilities"]), atol=1e-7,
            err_msg=form,
        )  # fmt: skip
    direct = PackageModel(packages["onnx"], device="cpu")
    assert list(direct.predict(images)["label"]) == list(reference["label"])  # N×H×W stack
    empty = direct.predict(pd.DataFrame({"image": []}))
    assert list(empty.columns) == list(OUTPUT_COLUMNS) and len(empty) == 0

    for bad in ([b"not an image"], [images[0].astype(np.float32)]):
        with pytest.raises(MlflowException) as err:
            model.predict(pd.DataFrame({"image": bad}))
        assert err.value.error_code == "INVALID_PARAMETER_VALUE"
        assert str(err.value).startswith(("row 0:", "rows 0-0:"))


def test_pytorch_package_answers_like_its_network(packages: dict[str, Path]) -> None:
    from dlpipe.tracking.package import load_torch_model

    images = np.random.default_rng(2).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    got = mlflow.pyfunc.load_model(str(packages["torch"])).predict(
        pd.DataFrame({"image": [_png(i) for i in images]})
    )
    x = torch.from_numpy(((images / 255.0 - MEAN) / STD).astype(np.float32)[:, None])
    with torch.inference_mode():
        probs = torch.softmax(load_torch_model(packages["torch"])(x).double(), dim=1).numpy()
    np.testing.assert_allclose(np.stack(got["probabilities"]), probs, atol=1e-6)


def test_text_pyfunc_tokenizes_with_the_package_tokenizer(tmp_path: Path) -> None:
    from dlpipe.data import DataPreprocessor

    package = make_text_package(tmp_path, "minilm", length=12)
    model = mlflow.pyfunc.load_model(str(package))
    assert Model.load(str(package / "MLmodel")).signature.inputs.input_names() == ["text"]
    texts = ["ok", "a fine film", "word " * 40]
    got = model.predict(pd.DataFrame({"text": texts}))
    tokens = DataPreprocessor.from_file(package / "preprocessing.json").tokenize(texts)
    counts = tokens["attention_mask"].sum(axis=1)
    assert counts.tolist()[0] == 3 and counts.tolist()[2] == 12
    # The graph's logits are [0.25 * tokens, 1]: P(long) = sigmoid(1 - 0.25 * tokens).
    expected = [1.0 / (1.0 + math.exp(0.25 * n - 1.0)) for n in counts]
    np.testing.assert_allclose([p[1] for p in got["probabilities"]], expected, atol=1e-6)
    with pytest.raises(MlflowException, match="expected a string"):
        PackageModel(package).predict([3])


def test_registering_a_plain_package_uploads_mlflow_files_beside_it(
    packages: dict[str, Path], tmp_mlflow_uri: str, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_mlflow_uri, cache_dir=tmp_path / "cache")
    meta = ModelMetadata.from_json((packages["plain"] / "metadata.json").read_text())
    version = registry.register_model(packages["plain"], meta)
    assert not (packages["plain"] / "MLmodel").exists()  # the caller's directory is untouched
    assert (Path(registry.get_model("m", version)) / "MLmodel").is_file()
    images = np.random.default_rng(3).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    got = mlflow.pyfunc.load_model(f"models:/m/{version}").predict(
        pd.DataFrame({"image": [_png(i) for i in images]})
    )
    np.testing.assert_allclose(
        np.stack(got["probabilities"]), _expected_probabilities(images), atol=1e-6
    )


RUN_SCRIPT = textwrap.dedent(
    """
    import sys
    from dlpipe.tracking.experiment import ExperimentTracker
    print(ExperimentTracker(sys.argv[1], "ctx").start_run("r", {}))
    """
)


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip()


def test_runs_carry_user_source_and_the_commit_of_the_checkout_they_run_in(
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    project = tmp_path / "project"
    project.mkdir()
    _git(project, "init", "-q")
    (project / "job.yaml").write_text("name: x\n")
    _git(project, "add", "job.yaml")
    _git(project, "commit", "-q", "-m", "job")
    head = _git(project, "rev-parse", "HEAD")
    # `python -c`: MLflow's own provider finds no script, so the working directory decides.
    proc = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, uri], cwd=project, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    run = MlflowClient(uri).get_run(proc.stdout.strip().splitlines()[-1])
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["mlflow.user"] == getpass.getuser() == run.info.user_id
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.name"]


class _TextSplits:
    """What `log_datasets` reads from a ClassifierDataModule: `raw_samples(split)`."""

    def __init__(self, texts: dict[str, list[str]]) -> None:
        self.texts = texts

    def raw_samples(self, split: str) -> list[tuple[str, int]]:
        return [(t, i % 2) for i, t in enumerate(self.texts[split])]


def test_dataset_digests_see_every_sample_and_splits_are_logged_with_sizes(
    tmp_path: Path,
) -> None:
    a = np.zeros((30, 28, 28, 1), dtype=np.uint8)
    b = a.copy()
    b[20, 5, 5, 0] = 1  # one pixel of the 21st image
    labels = np.zeros(30, dtype=np.int64)
    # MLflow's default digest hashes the first 10,000 elements only: it cannot tell them apart.
    default = [from_numpy(x, targets=labels).digest for x in (a, b)]
    assert default[0] == default[1]
    assert content_digest(a, labels) != content_digest(b, labels)
    assert content_digest(["ab", "c"]) != content_digest(["a", "bc"])

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("d")).info.run_id
    splits = {"train": ["w"] * 6, "val": ["x", "y"], "test": ["z", "zz", "zzz"]}
    cfg = PipelineConfig.model_validate({"name": "texts", "data": {"source": "rotten_tomatoes"}})
    digests = log_datasets(client, run_id, _TextSplits(splits), cfg)
    run_inputs = client.get_run(run_id).inputs
    assert run_inputs is not None
    inputs = run_inputs.dataset_inputs
    seen = {next(t.value for t in d.tags): d.dataset for d in inputs}
    assert set(seen) == {"training", "validation", "test"} and set(digests) == set(seen)
    for context, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        dataset = seen[context]
        assert dataset.name == f"texts-{split}" and dataset.digest == digests[context]
        assert json.loads(dataset.profile or "{}")["num_rows"] == len(splits[split])
        names = [c["name"] for c in json.loads(dataset.schema or "{}")["mlflow_colspec"]]
        assert names == ["text", "label"]
