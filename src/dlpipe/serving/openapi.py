"""The OpenAPI document of a running server: what it serves now, precisely enough that every
request it offers is one the server accepts (a schema-driven fuzzer checks that in `make test`).

FastAPI builds the document from the routes; `served_openapi` then narrows it to the loaded
versions: pinned versions and model names become enums, /predict offers the model's input kind,
and the v2 inference body describes one valid tensor for the model's input.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI


def v2_request_schema(served: Any) -> str:
    """JSON Schema (as text) of one valid v2 inference request for `served`: one sample."""
    pre = served.preprocessing
    if pre.task_type == "text_classification":
        tensor = {
            "name": {"const": "text"},
            "datatype": {"const": "BYTES"},
            "shape": {"enum": [[1]]},
            "data": {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"},
                "minItems": 1,
                "maxItems": 1,
            },
            "parameters": {"type": "object", "additionalProperties": False},
        }
    else:
        spec = served.engine.inputs[0]
        dims = [1, *[int(d) for d in spec["shape"][1:]]]
        size = 1
        for d in dims:
            size *= d
        tensor = {
            "name": {"const": spec["name"]},
            "datatype": {"const": "FP32"},
            "shape": {"enum": [dims]},
            "data": {
                "type": "array",
                # The FP32 range: beyond it a value is not an FP32 (400).
                "items": {"type": "number", "minimum": -3.4e38, "maximum": 3.4e38},
                "minItems": size,
                "maxItems": size,
            },
            "parameters": {"type": "object", "additionalProperties": False},
        }
    body = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "shape", "datatype", "data"],
                    "properties": tensor,
                    "additionalProperties": False,
                },
            },
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"enum": ["logits", "probabilities"]},
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "binary_data": {"type": "boolean"},
                                "classification": {"type": "integer", "minimum": 0},
                            },
                            "additionalProperties": False,
                        },
                    },
                    "additionalProperties": False,
                },
            },
            "parameters": {
                "type": "object",
                "properties": {"binary_data_output": {"type": "boolean"}},
            },
        },
        "additionalProperties": False,
    }
    return json.dumps(body, sort_keys=True)


def served_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document for what this server serves now (FastAPI's documented extension
    point): /predict offers images or text as the loaded model's task takes, and a pinned
    version is one of the served versions, so a client (or a schema-driven fuzzer) is not
    offered a request the server must refuse."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    manager = getattr(app.state, "manager", None)
    state = manager.state if manager is not None else None
    if state is None:
        return schema
    assert manager is not None  # a state comes from a manager
    versions, name = sorted(state.models), manager.model_name
    for operations in schema["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] in ("X-Model-Version", "version"):
                    parameter["schema"] = {"type": "string", "enum": versions}
                elif parameter["name"] == "name" and parameter["in"] == "path":
                    parameter["schema"] = {"type": "string", "enum": [name]}
    bodies = {v2_request_schema(m) for m in state.models.values()}
    if len(bodies) == 1:
        body = json.loads(bodies.pop())
        for path, operations in schema["paths"].items():
            if path.startswith("/v2/") and path.endswith("/infer"):
                operations["post"]["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": body}},
                }
    tasks = {m.preprocessing.task_type for m in state.models.values()}
    if len(tasks) == 1:
        unused = "application/json" if tasks == {"image_classification"} else "multipart/form-data"
        for path in ("/predict", "/predict/batch"):
            body = schema["paths"].get(path, {}).get("post", {}).get("requestBody", {})
            body.get("content", {}).pop(unused, None)
    return schema
