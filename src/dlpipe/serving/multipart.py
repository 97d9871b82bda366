"""A fast path for the multipart bodies that clients send to `/predict`: file parts only.

Starlette's form parser (python-multipart, a pure-Python state machine) spends about 37 us on a
one-file upload, more than any other step of a small model's request on the event loop. Bodies
as `requests`, `httpx`, `curl -F` and browsers write them are split here with `bytes.find`
instead (a few microseconds). Anything else, whether unusual or malformed (a preamble, other
headers, quoting, a non-file field, a missing end), is left to Starlette's parser, which then
answers exactly as before: `split_files` returns None rather than guess. A property test checks
that whatever this module accepts, Starlette's parser reads the same way.
"""

from __future__ import annotations

import re

FAST_PATH_MAX_BYTES = 1024 * 1024
"""Bodies up to this size (declared in Content-Length) are read whole and split here. Larger ones
stream through Starlette's parser, which spools big files to disk as they arrive instead of
holding the body twice (the whole body, then each file cut from it)."""

_CONTENT_TYPE = re.compile(
    rb"multipart/form-data;[ \t]*boundary=(\"?)([0-9A-Za-z'()+_,\-./:=?]{1,70})\1[ \t]*",
    re.IGNORECASE,
)
_DISPOSITION = re.compile(rb'form-data; name="([^"\\\r\n]*)"; filename="([^"\\\r\n]*)"')
_PART_CONTENT_TYPE = re.compile(rb"[!-~]+(?:[ \t]*;[ \t]*[!-~]+)*")


def boundary_of(content_type: bytes) -> bytes | None:
    """The boundary of a `multipart/form-data; boundary=...` header in its plain form, or None."""
    match = _CONTENT_TYPE.fullmatch(content_type)
    return match.group(2) if match else None


def _decode(raw: bytes) -> str:
    # As Starlette does: UTF-8 when it is, else Latin-1 (any byte string decodes).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _part(raw: bytes) -> tuple[str, str] | None:
    """(field name, filename) of one part's header block, or None when it is not plain."""
    disposition = None
    seen: set[bytes] = set()
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        key = name.lower()
        if not sep or key in seen or name != name.strip():
            return None
        seen.add(key)
        value = value.strip(b" \t")
        if key == b"content-disposition":
            disposition = _DISPOSITION.fullmatch(value)
            if disposition is None:
                return None
        elif key != b"content-type" or not _PART_CONTENT_TYPE.fullmatch(value):
            return None
    if disposition is None:
        return None
    return _decode(disposition.group(1)), _decode(disposition.group(2))


def split_files(
    body: bytes, content_type: bytes, field: str, max_files: int
) -> list[tuple[str, bytes]] | None:
    """[(filename, data)] of a body made only of file parts named `field` (at most
    `max_files`), in order; None when the body is anything else (let the full parser decide).

    An empty filename is returned as `field[i]`, as the route names unnamed files.
    """
    boundary = boundary_of(content_type)
    if boundary is None:
        return None
    opening = b"--" + boundary + b"\r\n"
    delimiter = b"\r\n--" + boundary
    if not body.startswith(opening):
        return None
    files: list[tuple[str, bytes]] = []
    start = len(opening)
    while True:
        headers_end = body.find(b"\r\n\r\n", start)
        if headers_end < 0:
            return None
        part = _part(body[start:headers_end])
        if part is None or part[0] != field or len(files) >= max_files:
            return None
        end = body.find(delimiter, headers_end + 4)
        if end < 0:
            return None
        filename = part[1]
        files.append((filename or f"{field}[{len(files)}]", body[headers_end + 4 : end]))
        after = end + len(delimiter)
        follows = body[after : after + 2]
        if follows == b"\r\n":
            start = after + 2
            continue
        if follows == b"--" and body[after + 2 :] in (b"", b"\r\n"):
            return files
        return None
