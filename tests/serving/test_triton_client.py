"""The real `tritonclient[http]` against a real `dlpipe serve`: Open Inference Protocol
conformance as Triton and KServe users meet it (binary and JSON tensors, versioned metadata and
readiness, requested and classification outputs, BYTES text inputs, errors)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dlpipe.evaluation import ServerProcess
from dlpipe.serving.engine import InferenceEngine

httpclient = pytest.importorskip("tritonclient.http", reason="make test installs tritonclient")
from tritonclient.utils import InferenceServerException  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from text_helpers import make_text_package  # noqa: E402


@pytest.fixture(scope="module")
def image_server(cnn_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("triton") / "server.log"
    env = {"DLPIPE_MODEL_NAME": "fashion"}
    with ServerProcess(package=str(cnn_package), env=env, log_path=log) as server:
        yield f"127.0.0.1:{server.port}"


def _image_input(x: np.ndarray, binary: bool) -> object:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_health_readiness_and_metadata_versioned_or_not(image_server: str) -> None:
    client = httpclient.InferenceServerClient(url=image_server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fashion") and client.is_model_ready("fashion", "1")
    assert not client.is_model_ready("fashion", "7") and not client.is_model_ready("other")
    server = client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"]
    for meta in (client.get_model_metadata("fashion"), client.get_model_metadata("fashion", "1")):
        assert meta["name"] == "fashion" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("fashion", "7")
    assert "not served" in err.value.message() and err.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_the_engine(image_server: str, cnn_package: Path, binary: bool) -> None:
    client = httpclient.InferenceServerClient(url=image_server)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    expected = InferenceEngine(cnn_package, "cpu").predict_batch(x)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    for version in ("", "1"):
        result = client.infer(
            "fashion", [_image_input(x, binary)], model_version=version, outputs=outputs
        )
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)
        assert result.as_numpy("probabilities") is None  # only what was asked for
        assert result.get_response()["model_version"] == "1"
    # No outputs named: all of them, binary (what tritonclient asks for by default).
    result = client.infer("fashion", [_image_input(x, binary)])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (4, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(1) == expected.argmax(1)).all()


def test_classification_extension_returns_top_k_labels(
    image_server: str, cnn_package: Path
) -> None:
    client = httpclient.InferenceServerClient(url=image_server)
    x = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
    wanted = [httpclient.InferRequestedOutput("probabilities", class_count=3)]
    top = client.infer("fashion", [_image_input(x, True)], outputs=wanted).as_numpy("probabilities")
    assert top.shape == (2, 3)
    expected = InferenceEngine(cnn_package, "cpu").predict_batch(x).argmax(1)
    for row, best in zip(top, expected, strict=True):
        score, index, label = row[0].decode().split(":")
        assert int(index) == best and label == f"class_{best}" and 0 < float(score) <= 1


def test_a_bad_request_is_the_clients_own_exception_with_the_message(image_server: str) -> None:
    client = httpclient.InferenceServerClient(url=image_server)
    x = np.zeros((1, 3, 28, 28), np.float32)  # three channels for a one-channel model
    with pytest.raises(InferenceServerException) as err:
        client.infer("fashion", [_image_input(x, True)])
    assert err.value.status() == "400" and "dimension 1 must be 1" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("fashion", [_image_input(np.zeros((1, 1, 28, 28), np.float32), True)],
                     outputs=[httpclient.InferRequestedOutput("scores")])  # fmt: skip
    assert "unknown output 'scores'" in err.value.message()


def test_text_model_takes_raw_strings_as_bytes(tmp_path: Path) -> None:
    from dlpipe.models.pretrained import minilm_dir

    package = make_text_package(tmp_path, minilm_dir(), length=16)
    with ServerProcess(package=str(package), env={"DLPIPE_MODEL_NAME": "text"}) as server:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        meta = client.get_model_metadata("text")
        assert meta["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
        for binary in (True, False):
            texts = np.array([b"short", b"a somewhat longer sentence"], dtype=object)
            tensor = httpclient.InferInput("text", [2], "BYTES")
            tensor.set_data_from_numpy(texts, binary_data=binary)
            logits = client.infer("text", [tensor]).as_numpy("logits")
            # The test graph's first logit is 0.25 x the number of tokens the server made:
            # [CLS] short [SEP] = 3 tokens, and 6 for the four-word one (MiniLM's WordPiece).
            assert logits.shape == (2, 2) and np.allclose(logits[:, 0], [0.75, 1.5]), logits
