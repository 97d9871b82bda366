"""`POST /predict` and `POST /predict/batch`: uploaded images (multipart) or JSON text."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from dlpipe.serving.deps import (
    AUTH_PARAMETERS,
    INFERENCE_ERRORS,
    ROUTING_PARAMETERS,
    error_responses,
    manager_of,
    routing_of,
)
from dlpipe.serving.dispatch import Prepared, infer, responding
from dlpipe.serving.errors import InvalidRequest, ServingError, UnsupportedMediaType
from dlpipe.serving.inputs import INLINE_DECODE_PIXELS, Sample, loads
from dlpipe.serving.multipart import FAST_PATH_MAX_BYTES, split_files
from dlpipe.serving.quality import Capture, observe_error, observe_prediction
from dlpipe.serving.served import ServedModel

router = APIRouter(tags=["predict"], responses=error_responses(*INFERENCE_ERRORS))


def _body_doc(field: str, many: bool) -> dict[str, Any]:
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    if many:
        file_schema = {"type": "array", "items": file_schema, "minItems": 1}
    text_schema: dict[str, Any] = {"type": "string", "minLength": 1}
    if many:
        text_schema = {"type": "array", "items": text_schema, "minItems": 1}
    text_field = "texts" if many else "text"
    return {
        "parameters": ROUTING_PARAMETERS + AUTH_PARAMETERS,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {field: file_schema},
                        "required": [field],
                        "additionalProperties": False,
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {text_field: text_schema},
                        "required": [text_field],
                        "additionalProperties": False,
                    }
                },
            },
        },
    }


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        raise InvalidRequest('empty request body; send JSON like {"text": "..."}')
    body = loads(raw)
    if not isinstance(body, dict):
        raise InvalidRequest(f"JSON body must be an object, got {type(body).__name__}")
    return body


async def _uploads(request: Request, field: str, max_files: int) -> list[tuple[str, bytes]]:
    # A small body of file parts only, as HTTP clients write them, is split directly. Any other
    # goes through Starlette's parser (which reads a body cached here, or streams a large one
    # as it arrives) and is answered as before.
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) <= FAST_PATH_MAX_BYTES:
        body = await request.body()
        content_type = request.headers.get("content-type", "").encode("latin-1")
        split = split_files(body, content_type, field, max_files)
        if split is not None:
            return split
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 8)
    except MultiPartException as err:
        raise InvalidRequest(f"malformed multipart body: {err.message}") from None
    try:
        names = sorted(set(form.keys()))
        files = [v for v in form.getlist(field) if isinstance(v, UploadFile)]
        if not files:
            raise InvalidRequest(f"expected a file in field {field!r}; got fields {names}")
        if names != [field] or len(files) != len(form.getlist(field)):
            raise InvalidRequest(f"only file parts named {field!r} are accepted; got {names}")
        return [(f.filename or f"{field}[{i}]", await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()


async def _read_payload(
    request: Request, file_field: str, text_field: str, max_items: int
) -> tuple[str, list[Any], list[str]]:
    """(kind, payloads, names): kind is "image" (bytes) or "text" (str)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    many = max_items > 1
    if content_type == "multipart/form-data":
        uploads = await _uploads(request, file_field, max_items)
        if not many and len(uploads) > 1:
            raise InvalidRequest(f"send one file in {file_field!r}; use /predict/batch for many")
        if len(uploads) > max_items:
            raise InvalidRequest(f"{len(uploads)} files exceed the limit of {max_items}")
        return "image", [data for _, data in uploads], [name for name, _ in uploads]
    if content_type == "application/json":
        body = await _json_body(request)
        if sorted(body) != [text_field]:
            raise InvalidRequest(
                f"JSON body takes exactly the field {text_field!r}; got {sorted(body)}"
            )
        value = body[text_field]
        texts = value if many else [value]
        if many and (not isinstance(value, list) or not value):
            raise InvalidRequest(f"{text_field!r} must be a non-empty list of strings")
        if len(texts) > max_items:
            raise InvalidRequest(f"{len(texts)} texts exceed the limit of {max_items} per request")
        return "text", texts, [f"{text_field}[{i}]" for i in range(len(texts))]
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        if many:
            raise InvalidRequest("/predict/batch takes multipart 'files' or JSON 'texts'")
        return "image", [await request.body()], ["body"]
    raise UnsupportedMediaType(
        f"unsupported content type {content_type or '(none)'!r}; send multipart/form-data with "
        f"{file_field!r}, application/json with {text_field!r}, or a raw image/* body"
    )


def _prepare(
    request: Request, kind: str, payloads: list[Any], names: list[str]
) -> tuple[Prepared, list[int] | None]:
    """Check the payloads against the upload policy (before any decoding) and say how to turn
    them into samples for whichever version routing picks; the images' pixel counts."""
    policy = request.app.state.upload_policy
    sizes: list[int] = []
    if kind == "image":  # headers read once here; the pixels are decoded once, later
        payloads = [policy.open_image(p, n) for p, n in zip(payloads, names, strict=True)]
        sizes = [image.width * image.height for image in payloads]
    else:
        for payload, name in zip(payloads, names, strict=True):
            policy.check_text(payload, name)
    pixels = sum(sizes)

    def make_samples(served: ServedModel) -> list[Sample]:
        if kind == "image":
            return [served.decoder.image(p, n) for p, n in zip(payloads, names, strict=True)]
        return [served.decoder.text(p, n) for p, n in zip(payloads, names, strict=True)]

    offload = kind == "image" and pixels > INLINE_DECODE_PIXELS
    prepared = Prepared(make_samples, request.app.state.decode_pool if offload else None)
    return prepared, sizes if kind == "image" else None


async def _infer(
    request: Request, kind: str, payloads: list[Any], names: list[str]
) -> tuple[ServedModel, list[Any], Capture, list[int] | None]:
    """Prepare, route and infer; a failure on a chosen version goes to the quality log."""
    prepared, sizes = _prepare(request, kind, payloads, names)
    capture = Capture(prepared)
    try:
        served, logits = await infer(
            request, manager_of(request), *routing_of(request), capture.prepared
        )
    except ServingError as err:
        observe_error(request, err)
        raise
    return served, logits, capture, sizes


def _response(request: Request, served: ServedModel, predictions: Any) -> dict[str, Any]:
    # Returned as a JSONResponse: FastAPI's response validation and jsonable_encoder would
    # walk every prediction again.
    started = getattr(request.state, "started", time.perf_counter())
    return {
        "predictions": predictions,
        "model_name": served.model_name,
        "model_version": served.version,
        "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
        "request_id": request.state.request_id,
    }


@router.post("/predict", openapi_extra=_body_doc("file", many=False))
async def predict(request: Request) -> JSONResponse:
    """Classify one uploaded image (`file`) or one text (`{"text": ...}`): top-k labels."""
    manager_of(request)
    kind, payloads, names = await _read_payload(request, "file", "text", 1)
    served, logits, capture, sizes = await _infer(request, kind, payloads, names)
    with responding(request):
        k = request.app.state.settings.top_k
        answer = served.top_k(logits[0], k)
        observe_prediction(request, served, logits, capture.samples, sizes, [answer])
        return JSONResponse(_response(request, served, answer))


@router.post("/predict/batch", openapi_extra=_body_doc("files", many=True))
async def predict_batch(request: Request) -> JSONResponse:
    """Classify many uploaded images (`files`) or texts (`{"texts": [...]}`), in order."""
    manager_of(request)
    limit = request.app.state.settings.max_batch_items
    kind, payloads, names = await _read_payload(request, "files", "texts", limit)
    served, logits, capture, sizes = await _infer(request, kind, payloads, names)
    with responding(request):
        k = request.app.state.settings.top_k
        answers = [served.top_k(row, k) for row in logits]
        observe_prediction(request, served, logits, capture.samples, sizes, answers)
        body = _response(request, served, answers)
        body["inputs"] = names
        return JSONResponse(body)
