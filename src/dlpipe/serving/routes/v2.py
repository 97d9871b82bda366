"""Open Inference Protocol (KServe v2) routes: Triton and KServe clients work unchanged.

Wire format in `dlpipe.serving.oip` (JSON and binary tensors). Inputs are preprocessed tensors
(`FP32` images N x C x H x W; `INT64` `input_ids` and `attention_mask` N x L) or, for text
models, raw strings as a `BYTES` input `text` (N), tokenized here with the model's saved
preprocessing. Outputs: `logits` and `probabilities` (`FP32`, N x K), each also as top-k
`BYTES` strings through the classification extension. Errors are `{"error": "<message>"}`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from dlpipe import __version__
from dlpipe.serving.deps import (
    AUTH_PARAMETERS,
    INFERENCE_ERRORS,
    READ_ERRORS,
    ManagerDep,
    RoutingDep,
    error_responses,
)
from dlpipe.serving.dispatch import infer, responding
from dlpipe.serving.engine import ShapeMismatchError
from dlpipe.serving.errors import InvalidRequest, ModelUnavailable, NotFound, ServingError
from dlpipe.serving.inputs import Sample
from dlpipe.serving.manager import ModelManager
from dlpipe.serving.oip import (
    EXTENSIONS,
    InferRequest,
    classify,
    datatype_of,
    encode_response,
    parse_request,
)
from dlpipe.serving.quality import Capture, observe_error, observe_prediction
from dlpipe.serving.served import ServedModel

router = APIRouter(
    prefix="/v2",
    tags=["v2 (Open Inference Protocol)"],
    responses=error_responses(*READ_ERRORS, protocol=True),
)
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "outputs as JSON; with binary outputs a JSON header of "
        "Inference-Header-Content-Length bytes, then the raw tensors",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **error_responses(*INFERENCE_ERRORS, 422, protocol=True),
}
OUTPUTS = ("logits", "probabilities")
TEXT_INPUT = "text"


class NonFiniteOutput(ServingError):
    """The model's answer for these inputs is not a finite number (inputs out of range?)."""

    status_code = 422
    error_type = "non_finite_output"


def _check_name(manager: ModelManager, name: str) -> None:
    if name != manager.model_name:
        raise NotFound(
            f"model {name!r} is not served here; this server serves {manager.model_name!r}"
        )


def _served(manager: ModelManager, name: str, version: str | None) -> ServedModel:
    _check_name(manager, name)
    served, _ = manager.route(version)
    return served


def _samples(request: InferRequest) -> Any:
    tensors = request.inputs

    def make_samples(served: ServedModel) -> list[Sample]:
        decoder = served.decoder
        if TEXT_INPUT in tensors and served.preprocessing.task_type == "text_classification":
            if len(tensors) != 1 or tensors[TEXT_INPUT].dtype != object:
                raise InvalidRequest(f"send {TEXT_INPUT!r} alone, as a BYTES tensor of strings")
            texts = []
            for i, raw in enumerate(tensors[TEXT_INPUT].reshape(-1)):
                try:
                    texts.append(raw.decode())
                except UnicodeDecodeError:
                    raise InvalidRequest(f"{TEXT_INPUT}[{i}] is not UTF-8 text") from None
            return [decoder.text(t, f"{TEXT_INPUT}[{i}]") for i, t in enumerate(texts)]
        engine = served.engine
        if sorted(tensors) != sorted(engine.input_names):
            accepted = str(engine.input_names)
            if served.preprocessing.task_type == "text_classification":
                accepted = f"[{TEXT_INPUT!r}] or {accepted}"
            raise InvalidRequest(f"model inputs are {accepted}; got {sorted(tensors)}")
        for spec in engine.inputs:
            array = tensors[spec["name"]]
            if array.dtype == object:
                raise InvalidRequest(f"input {spec['name']!r} must be numeric, not BYTES")
            try:
                engine.check_shape(spec["name"], array.shape, spec["shape"])
            except ShapeMismatchError as err:
                raise InvalidRequest(str(err)) from None
        sizes = {array.shape[0] for array in tensors.values()}
        if len(sizes) != 1:
            raise InvalidRequest(f"inputs disagree on the batch dimension: {sorted(sizes)}")
        if served.preprocessing.task_type == "text_classification":
            decoder.tokens(tensors["input_ids"], tensors["attention_mask"], "inputs")
        cast = {s["name"]: tensors[s["name"]].astype(s["dtype"], copy=False) for s in engine.inputs}
        if len(cast) == 1:
            return list(next(iter(cast.values())))
        return [{k: v[i] for k, v in cast.items()} for i in range(next(iter(sizes)))]

    return make_samples


def _outputs(
    request: InferRequest, served: ServedModel, logits: np.ndarray
) -> tuple[list[tuple[str, np.ndarray]], set[str]]:
    if not np.isfinite(logits).all():
        raise NonFiniteOutput("the model's output is not finite for these inputs (out of range?)")
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(z)
    probabilities = (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32)
    values = {"logits": logits.astype(np.float32), "probabilities": probabilities}
    wanted = request.outputs
    if wanted is None:
        names = [(name, values[name]) for name in OUTPUTS]
        return names, set(OUTPUTS) if request.binary_output else set()
    out: list[tuple[str, np.ndarray]] = []
    binary: set[str] = set()
    labels = served.preprocessing.class_names
    for spec in wanted:
        if spec.name not in values:
            raise InvalidRequest(f"unknown output {spec.name!r}; outputs are {list(OUTPUTS)}")
        array = values[spec.name]
        if spec.classification:
            array = classify(array, spec.classification, labels)
        out.append((spec.name, array))
        if spec.binary:
            binary.add(spec.name)
    return out, binary


async def _infer(
    request: Request, manager: ManagerDep, name: str, version: str | None, key: str | None
) -> Response:
    _check_name(manager, name)
    parsed = parse_request(
        await request.body(), request.headers.get("inference-header-content-length")
    )
    capture = Capture(_samples(parsed))
    try:
        served, logits = await infer(request, manager, version, key, capture.prepared)
        with responding(request):
            outputs, binary = _outputs(parsed, served, np.stack(logits))
            body, headers = encode_response(
                served.model_name, served.version, outputs, binary, parsed.id
            )
            observe_prediction(request, served, logits, capture.samples)
            return Response(body, headers=headers)
    except ServingError as err:
        observe_error(request, err)  # on a chosen version: its error rate
        raise


@router.get("")
async def server_metadata() -> dict[str, Any]:
    """Server name, version and the protocol extensions it supports."""
    return {"name": "dlpipe", "version": __version__, "extensions": EXTENSIONS}


def _metadata(manager: ModelManager, name: str, served: ServedModel) -> dict[str, Any]:
    info = served.engine.get_model_info()
    state = manager.state
    inputs = [
        {
            "name": i["name"],
            "datatype": datatype_of(np.dtype(i["dtype"])),
            "shape": [d if isinstance(d, int) else -1 for d in i["shape"]],
        }
        for i in info["inputs"]
    ]
    if served.preprocessing.task_type == "text_classification":
        # Either raw strings (tokenized here) or the token tensors themselves.
        inputs.insert(0, {"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]})
    k = len(served.preprocessing.class_names or []) or -1
    return {
        "name": name,
        "versions": sorted(state.models) if state else [],
        "platform": "onnxruntime_onnx" if info["framework"] == "onnx" else "pytorch_libtorch",
        "inputs": inputs,
        "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, k]} for o in OUTPUTS],
    }


@router.get("/models/{name}")
async def model_metadata(name: str, manager: ManagerDep) -> dict[str, Any]:
    """Versions, inputs and outputs of the served model (of the version routing picks)."""
    return _metadata(manager, name, _served(manager, name, None))


@router.get("/models/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, manager: ManagerDep) -> dict[str, Any]:
    """Metadata of one served version (404 when it is not served)."""
    metadata = _metadata(manager, name, _served(manager, name, version))
    return {**metadata, "versions": [version]}


def _ready(manager: ModelManager, name: str, version: str | None) -> dict[str, Any]:
    try:
        _served(manager, name, version)
    except ModelUnavailable:
        raise ModelUnavailable(f"model {name!r} is not ready yet") from None
    return {"name": name, "ready": True} | ({"version": version} if version else {})


@router.get("/models/{name}/ready")
async def model_ready(name: str, manager: ManagerDep) -> dict[str, Any]:
    """200 when a version of the model serves (503 while loading)."""
    return _ready(manager, name, None)


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, manager: ManagerDep) -> dict[str, Any]:
    """200 when this version serves (404 when it is not served, 503 while nothing is loaded)."""
    return _ready(manager, name, version)


@router.post(
    "/models/{name}/infer",
    openapi_extra={"parameters": AUTH_PARAMETERS},
    responses=INFER_RESPONSES,
)
async def infer_default(
    name: str, request: Request, manager: ManagerDep, routing: RoutingDep
) -> Response:
    """Inference on the version routing picks (champion or A/B, or X-Model-Version)."""
    return await _infer(request, manager, name, *routing)


@router.post(
    "/models/{name}/versions/{version}/infer",
    openapi_extra={"parameters": AUTH_PARAMETERS},
    responses=INFER_RESPONSES,
)
async def infer_version(name: str, version: str, request: Request, manager: ManagerDep) -> Response:
    """Inference on exactly `version` (404 when it is not served)."""
    return await _infer(request, manager, name, version, None)
