"""The Open Inference Protocol (KServe v2) wire format: requests in, responses out.

    request = parse_request(body, headers.get("inference-header-content-length"))
    body, headers = encode_response(response, binary={"logits"})

JSON tensors and the binary tensor data extension (Triton's `binary_tensor_data`: a JSON header
of `Inference-Header-Content-Length` bytes, then each binary tensor's raw little-endian bytes in
input order; `BYTES` elements are 4-byte length-prefixed). Every malformed request raises
`InvalidRequest` naming what was wrong, whatever the body holds: deep nesting, huge or
non-finite numbers, wrong shapes, datatypes or sizes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlpipe.serving.errors import InvalidRequest
from dlpipe.serving.inputs import loads

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
DATATYPES = (*NUMERIC, "BYTES")
EXTENSIONS = ["binary_tensor_data", "classification"]
"""What `GET /v2` announces: the binary tensor data and classification extensions."""


def datatype_of(dtype: np.dtype[Any] | type) -> str:
    """The protocol's name of a numpy dtype (object arrays are BYTES)."""
    kind = np.dtype(dtype)
    if kind == np.dtype(object):
        return "BYTES"
    for name, numeric in NUMERIC.items():
        if np.dtype(numeric) == kind:
            return name
    raise ValueError(f"no Open Inference Protocol datatype for {kind}")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0
    """Top-k as `"score:index[:label]"` strings (Triton's classification extension); 0: off."""


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None = None
    """Outputs asked for (None: all, in binary when `binary_output` is set)."""
    binary_output: bool = False
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


REQUEST_KEYS = frozenset({"id", "inputs", "outputs", "parameters"})
TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})


def _known_keys(doc: dict[str, Any], known: frozenset[str] | set[str], where: str) -> None:
    """Unknown fields are refused by name: a misspelt `datatpye` must not pass silently."""
    unknown = sorted(str(k)[:40] for k in doc if k not in known)
    if unknown:
        raise InvalidRequest(f"{where} has unknown field(s) {unknown}; known: {sorted(known)}")


def _header_split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise InvalidRequest(
            f"Inference-Header-Content-Length {header_length!r} is not a length within the "
            f"{len(body)}-byte body"
        )
    n = int(header_length)
    return body[:n], body[n:]


def parse_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Decode an inference request (JSON, or JSON header + binary tensors)."""
    if not body:
        raise InvalidRequest("empty request body; send a JSON object with 'inputs'")
    head, binary = _header_split(body, header_length)
    doc = loads(head)
    if not isinstance(doc, dict):
        raise InvalidRequest("request body must be a JSON object with 'inputs'")
    _known_keys(doc, REQUEST_KEYS, "the request")
    specs = doc.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise InvalidRequest("body needs 'inputs': a non-empty list of tensors")
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidRequest("'parameters' must be an object")
    if not isinstance(parameters.get("binary_data_output", False), bool):
        raise InvalidRequest("parameters.binary_data_output must be true or false")
    if header_length is None and any(
        isinstance(spec, dict)
        and isinstance(spec.get("parameters"), dict)
        and "binary_data_size" in spec["parameters"]
        for spec in specs
    ):
        raise InvalidRequest(
            "binary_data_size needs the binary tensor data extension: send the JSON header's "
            "length in Inference-Header-Content-Length"
        )
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):
        name, array, offset = _input(spec, i, binary, offset)
        if name in inputs:
            raise InvalidRequest(f"inputs[{i}]: input {name!r} is given twice")
        inputs[name] = array
    if offset != len(binary):
        raise InvalidRequest(
            f"{len(binary) - offset} bytes of binary data follow the inputs' declared sizes"
        )
    request_id = doc.get("id")
    if "id" in doc and not isinstance(request_id, str):
        raise InvalidRequest("'id' must be a string")
    if "outputs" in doc and not isinstance(doc["outputs"], list):
        raise InvalidRequest("'outputs' must be a list")
    return InferRequest(
        inputs=inputs,
        outputs=_outputs(doc.get("outputs")),
        binary_output=parameters.get("binary_data_output") is True,
        id=request_id,
        parameters=parameters,
    )


def _shape(value: Any, where: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    ):
        raise InvalidRequest(
            f"{where}.shape must be a non-empty list of integers >= 0, got {value!r}"[:300]
        )
    return value


def _input(spec: Any, i: int, binary: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    where = f"inputs[{i}]"
    if not isinstance(spec, dict):
        raise InvalidRequest(f"{where} must be an object with name, shape, datatype and data")
    _known_keys(spec, TENSOR_KEYS, where)
    missing = [k for k in ("name", "shape", "datatype") if k not in spec]
    if missing:
        raise InvalidRequest(f"{where} lacks {missing}")
    name, datatype = spec["name"], spec["datatype"]
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{where}.name must be a non-empty string")
    if datatype not in DATATYPES:
        raise InvalidRequest(
            f"{where}.datatype {str(datatype)[:40]!r}; use one of {list(DATATYPES)}"
        )
    shape = _shape(spec["shape"], where)
    count = math.prod(shape)
    params = spec.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidRequest(f"{where}.parameters must be an object")
    _known_keys(params, {"binary_data_size"}, f"{where}.parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest(f"{where}.parameters.binary_data_size must be an integer >= 0")
        if offset + size > len(binary):
            raise InvalidRequest(
                f"{where} declares {size} bytes of binary data; only {len(binary) - offset} follow"
            )
        raw = binary[offset : offset + size]
        flat = _from_binary(raw, datatype, count, where)
        offset += size
    elif "data" in spec:
        flat = _from_json(spec["data"], datatype, where)
    else:
        raise InvalidRequest(f"{where} has neither 'data' nor parameters.binary_data_size")
    if flat.size != count:
        raise InvalidRequest(
            f"{where} ({name!r}): shape {shape} needs {count} values, got {flat.size}"
        )
    return name, flat.reshape(shape), offset


def _from_binary(raw: bytes, datatype: str, count: int, where: str) -> np.ndarray:
    if datatype == "BYTES":
        items: list[bytes] = []
        pos = 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise InvalidRequest(f"{where}: BYTES element length prefix cut short")
            (length,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + length > len(raw):
                raise InvalidRequest(f"{where}: BYTES element of {length} bytes cut short")
            items.append(raw[pos : pos + length])
            pos += length
        return np.array(items, dtype=object)
    dtype = np.dtype(NUMERIC[datatype]).newbyteorder("<")
    needed = count * dtype.itemsize
    if len(raw) != needed:
        raise InvalidRequest(
            f"{where}: {len(raw)} bytes of {datatype} data; the shape needs {needed}"
        )
    array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
    return _finite(array, where)


def _from_json(data: Any, datatype: str, where: str) -> np.ndarray:
    if datatype == "BYTES":
        flat = _flatten(data, where)
        if not all(isinstance(x, str) for x in flat):
            raise InvalidRequest(f"{where}.data: BYTES data must be strings")
        return np.array([x.encode() for x in flat], dtype=object)
    flat = _flatten(data, where)
    kind = NUMERIC[datatype]
    if datatype == "BOOL":
        if not all(isinstance(x, bool) for x in flat):
            raise InvalidRequest(f"{where}.data: BOOL data must be true/false")
        return np.array(flat, dtype=np.bool_)
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat):
        raise InvalidRequest(f"{where}.data: {datatype} data must be numbers")
    if np.issubdtype(kind, np.integer):
        info = np.iinfo(kind)
        if not all(isinstance(x, int) for x in flat):
            raise InvalidRequest(f"{where}.data: {datatype} data must be integers")
        if flat and not (info.min <= min(flat) and max(flat) <= info.max):
            raise InvalidRequest(f"{where}.data: a value lies outside {datatype}'s range")
        return np.array(flat, dtype=kind)
    try:
        array = np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer too large even for a float
        raise InvalidRequest(f"{where}.data: a value lies outside {datatype}'s range") from None
    with np.errstate(over="ignore"):
        return _finite(array.astype(kind), where)


def _flatten(data: Any, where: str) -> list[Any]:
    """Row-major flat list of a (possibly nested) JSON list; ragged nesting is refused."""
    if not isinstance(data, list):
        raise InvalidRequest(f"{where}.data must be a list")
    out: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:  # iterative: a 50,000-level nesting must not recurse
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > 32:
                raise InvalidRequest(f"{where}.data is nested deeper than any tensor")
            stack.append(iter(item))
        else:
            out.append(item)
    return out


_END = object()


def _finite(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidRequest(
            f"{where}.data holds NaN or infinity (or a value beyond the type's range)"
        )
    return array


def _outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidRequest("'outputs' must be a list")
    out = []
    for i, spec in enumerate(value):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidRequest(f"outputs[{i}] must be an object with a 'name'")
        _known_keys(spec, {"name", "parameters"}, f"outputs[{i}]")
        params = spec.get("parameters", {})
        if not isinstance(params, dict):
            raise InvalidRequest(f"outputs[{i}].parameters must be an object")
        _known_keys(params, {"binary_data", "classification"}, f"outputs[{i}].parameters")
        if not isinstance(params.get("binary_data", False), bool):
            raise InvalidRequest(f"outputs[{i}].parameters.binary_data must be true or false")
        k = params.get("classification", 0)
        if isinstance(k, float) and k.is_integer():  # JSON's 3.0 is the integer 3
            k = int(k)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise InvalidRequest(f"outputs[{i}].parameters.classification must be an integer >= 0")
        out.append(RequestedOutput(spec["name"], params.get("binary_data") is True, k))
    return out


def classify(scores: np.ndarray, k: int, labels: list[str] | None) -> np.ndarray:
    """Top-k `"score:index[:label]"` strings per row (Triton's classification extension)."""
    rows = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        rows.append(
            [
                f"{row[j]:f}:{j}" + (f":{labels[j]}" if labels and j < len(labels) else "")
                for j in order
            ]
        )
    return np.array([[s.encode() for s in r] for r in rows], dtype=object)


def encode_response(
    model_name: str,
    model_version: str,
    outputs: list[tuple[str, np.ndarray]],
    binary: set[str],
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers; tensors named in `binary` go as raw bytes."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    blobs: list[bytes] = []
    tensors = []
    for name, array in outputs:
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if name in binary:
            blob = _to_binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype == object:
            entry["data"] = [x.decode() for x in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        tensors.append(entry)
    doc["outputs"] = tensors
    head = json.dumps(doc).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head)),
    }
    return head + b"".join(blobs), headers


def _to_binary(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return b"".join(struct.pack("<I", len(x)) + x for x in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
