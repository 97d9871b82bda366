"""Open Inference Protocol (KServe v2) routes, so Triton/KServe clients work unchanged.

Inputs are already-preprocessed tensors (`FP32` images N×C×H×W, `INT64` token ids N×L);
the output is `logits` (`FP32`, N×K).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from dlpipe import __version__
from dlpipe.serving.deps import AUTH_PARAMETERS, ManagerDep, RoutingDep
from dlpipe.serving.dispatch import infer
from dlpipe.serving.engine import ShapeMismatchError
from dlpipe.serving.errors import InvalidRequest, NotFound
from dlpipe.serving.inputs import Sample
from dlpipe.serving.manager import ModelManager
from dlpipe.serving.served import ServedModel

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

_DATATYPES = {
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "UINT8": np.uint8,
}
_NUMPY_TO_V2 = {
    "float32": "FP32",
    "float16": "FP16",
    "float64": "FP64",
    "int64": "INT64",
    "int32": "INT32",
    "uint8": "UINT8",
}


def _check_name(manager: ModelManager, name: str) -> None:
    if name != manager.model_name:
        raise NotFound(f"model {name!r} is not served here; server serves {manager.model_name!r}")


def _tensor(spec: Any, index: int) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict):
        raise InvalidRequest(f"inputs[{index}] must be an object with name, shape, datatype, data")
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in spec]
    if missing:
        raise InvalidRequest(f"inputs[{index}] lacks {missing}")
    name, shape, datatype = spec["name"], spec["shape"], spec["datatype"]
    if datatype not in _DATATYPES:
        allowed = sorted(_DATATYPES)
        raise InvalidRequest(f"inputs[{index}].datatype {datatype!r}; use one of {allowed}")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise InvalidRequest(f"inputs[{index}].shape must be positive ints, got {shape!r}")
    try:
        flat = np.asarray(spec["data"], dtype=_DATATYPES[datatype]).reshape(-1)
    except (TypeError, ValueError) as err:
        raise InvalidRequest(f"inputs[{index}].data is not {datatype} numbers: {err}") from None
    expected = int(np.prod(shape))
    if flat.size != expected:
        raise InvalidRequest(
            f"inputs[{index}] ({name!r}): shape {shape} needs {expected} values, got {flat.size}"
        )
    return str(name), flat.reshape(shape)


def _samples(body: dict[str, Any]) -> Any:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("body needs 'inputs': a non-empty list of tensors")
    tensors = dict(_tensor(spec, i) for i, spec in enumerate(inputs))
    sizes = {arr.shape[0] for arr in tensors.values()}
    if len(sizes) != 1:
        raise InvalidRequest(f"inputs disagree on the batch dimension: {sorted(sizes)}")

    def make_samples(served: ServedModel) -> list[Sample]:
        engine = served.engine
        unknown = sorted(set(tensors) - set(engine.input_names))
        if unknown or len(tensors) != len(engine.input_names):
            raise InvalidRequest(f"model inputs are {engine.input_names}; got {sorted(tensors)}")
        for spec in engine.inputs:
            try:
                engine.check_shape(spec["name"], tensors[spec["name"]].shape, spec["shape"])
            except ShapeMismatchError as err:
                raise InvalidRequest(str(err)) from None
        n = next(iter(sizes))
        if len(tensors) == 1:
            only = next(iter(tensors.values())).astype(engine.inputs[0]["dtype"], copy=False)
            return list(only)
        return [{k: v[i] for k, v in tensors.items()} for i in range(n)]

    return make_samples


async def _infer(
    request: Request, manager: ModelManager, name: str, version: str | None, key: str | None
) -> dict[str, Any]:
    _check_name(manager, name)
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidRequest(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object with 'inputs'")
    served, logits = await infer(request, manager, version, key, _samples(body))
    out = np.stack(logits).astype(np.float32)
    response: dict[str, Any] = {
        "model_name": served.model_name,
        "model_version": served.version,
        "outputs": [
            {
                "name": "logits",
                "datatype": "FP32",
                "shape": list(out.shape),
                "data": out.reshape(-1).tolist(),
            }
        ],
    }
    if "id" in body:
        response["id"] = body["id"]
    return response


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "dlpipe", "version": __version__, "extensions": []}


@router.get("/models/{name}")
async def model_metadata(name: str, manager: ManagerDep) -> dict[str, Any]:
    """Versions, inputs and outputs of the served model (v2 model metadata)."""
    _check_name(manager, name)
    served, _ = manager.route()
    info = served.engine.get_model_info()
    state = manager.state
    return {
        "name": name,
        "versions": sorted(state.models) if state else [],
        "platform": "onnxruntime_onnx" if info["framework"] == "onnx" else "pytorch_libtorch",
        "inputs": [
            {
                "name": i["name"],
                "datatype": _NUMPY_TO_V2.get(i["dtype"], "FP32"),
                "shape": [d if isinstance(d, int) else -1 for d in i["shape"]],
            }
            for i in info["inputs"]
        ],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, -1]}],
    }


@router.get("/models/{name}/ready")
async def model_ready(name: str, manager: ManagerDep) -> dict[str, Any]:
    _check_name(manager, name)
    manager.route()  # 503 when nothing is loaded
    return {"name": name, "ready": True}


@router.post("/models/{name}/infer", openapi_extra={"parameters": AUTH_PARAMETERS})
async def infer_default(
    name: str, request: Request, manager: ManagerDep, routing: RoutingDep
) -> dict[str, Any]:
    """Inference on the version routing picks (champion or A/B, or X-Model-Version)."""
    return await _infer(request, manager, name, *routing)


@router.post(
    "/models/{name}/versions/{version}/infer", openapi_extra={"parameters": AUTH_PARAMETERS}
)
async def infer_version(
    name: str, version: str, request: Request, manager: ManagerDep
) -> dict[str, Any]:
    """Inference on exactly `version` (404 when it is not served)."""
    return await _infer(request, manager, name, version, None)
