"""The multipart fast path (`dlpipe.serving.multipart`) against Starlette's own parser: whatever
the fast path accepts, Starlette reads the same way; what real clients send, it accepts."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from dlpipe.serving.multipart import boundary_of, split_files

# Not a design property: a guard on a performance shortcut (not one of the 27).


def _starlette(body: bytes, content_type: bytes, field: str, max_files: int) -> object:
    """What the route read before the fast path: [(filename, data)], or the failure."""

    async def parse() -> object:
        sent = False

        async def receive() -> dict[str, object]:
            nonlocal sent
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/",
            "query_string": b"",
            "headers": [(b"content-type", content_type)],
        }
        request = Request(scope, receive)
        try:
            form = await request.form(max_files=max_files, max_fields=max_files + 8)
        except MultiPartException as err:
            return ("error", err.message)
        try:
            if sorted(set(form.keys())) != [field]:
                return ("fields", sorted(form.keys()))
            values = form.getlist(field)
            if not all(isinstance(v, UploadFile) for v in values):
                return ("not files", len(values))
            return [
                (v.filename or f"{field}[{i}]", await v.read())  # type: ignore[union-attr]
                for i, v in enumerate(values)
            ]
        finally:
            await form.close()

    return asyncio.run(parse())


_BOUNDARY = st.text("abcXYZ0129'()+_,-./:=?", min_size=1, max_size=70)
_CONTENT = st.one_of(
    st.binary(max_size=64),
    st.lists(st.sampled_from([b"\r\n", b"--", b"\r\n--", b"x", b"\r", b"\n", b"--b"])).map(
        b"".join
    ),
)
_PLAIN_FILENAME = st.text(st.characters(blacklist_characters='"\\\r\n'), max_size=12)
_FILENAME = st.one_of(
    _PLAIN_FILENAME.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=12),
    st.just(b"x.png"),
    st.just(b""),
)


@st.composite
def _bodies(draw: st.DrawFn, field: str | None = None) -> tuple[bytes, bytes, int]:
    """A multipart body, its content type and a file limit. With `field`: a well-formed body
    of 1-3 files named `field` as clients write them; without: anything near that, damaged."""
    boundary = draw(_BOUNDARY).encode()
    quoted = draw(st.booleans())
    content_type = b"multipart/form-data; boundary=" + (
        b'"' + boundary + b'"' if quoted else boundary
    )
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([b"file", b"files", b"file", b"files", b"other", b""]))
        filename = draw(_FILENAME)
        if field is not None:
            name = field.encode()
            filename = draw(_PLAIN_FILENAME).encode("utf-8", "surrogatepass")
        plain = b'form-data; name="%s"; filename="%s"' % (name, filename)
        disposition = (
            plain
            if field is not None
            else draw(
                st.sampled_from(
                    [
                        plain,
                        plain,
                        plain,
                        b'form-data; name="%s"' % name,
                        b'form-data; filename="%s"; name="%s"' % (filename, name),
                        b'Form-Data; name="%s"; filename="%s"' % (name, filename),
                        b"form-data; name=\"%s\"; filename*=utf-8''%s" % (name, filename),
                    ]
                )
            )
        )
        headers = [b"Content-Disposition: " + disposition]
        if draw(st.booleans()):
            headers.append(b"Content-Type: " + draw(st.sampled_from([b"image/png", b"a/b; c=d"])))
        if draw(st.booleans()):
            headers.reverse()
        content = draw(_CONTENT)
        if field is not None:  # a well-formed part never holds its own delimiter
            tail = content + b"\r\n--" + boundary
            content = content if tail.find(b"\r\n--" + boundary) == len(content) else b"x"
        parts.append(b"\r\n".join(headers) + b"\r\n\r\n" + content)
    body = b"--" + boundary + b"\r\n"
    body += (b"\r\n--" + boundary + b"\r\n").join(parts)
    body += b"\r\n--" + boundary + b"--"
    if field is not None:
        return body + draw(st.sampled_from([b"", b"\r\n"])), content_type, 3
    body += draw(st.sampled_from([b"", b"\r\n", b"x"]))
    # Damage some bodies: cut them, or flip one byte.
    damage = draw(st.integers(0, 5))
    if damage == 0:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif damage == 1:
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([draw(st.integers(0, 255))]) + body[i + 1 :]
    return body, content_type, draw(st.integers(1, 5))


@settings(max_examples=400, deadline=None)
@given(case=_bodies(), field=st.sampled_from(["file", "files"]))
def test_what_the_fast_path_accepts_starlette_reads_the_same(
    case: tuple[bytes, bytes, int], field: str
) -> None:
    body, content_type, max_files = case
    fast = split_files(body, content_type, field, max_files)
    if fast is not None:
        assert fast == _starlette(body, content_type, field, max_files)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), field=st.sampled_from(["file", "files"]))
def test_well_formed_bodies_take_the_fast_path(data: st.DataObject, field: str) -> None:
    body, content_type, max_files = data.draw(_bodies(field))
    fast = split_files(body, content_type, field, max_files)
    assert fast is not None
    assert fast == _starlette(body, content_type, field, max_files)


@pytest.mark.parametrize("files", [1, 3])
def test_bodies_written_by_httpx_take_the_fast_path(files: int) -> None:
    uploads = [
        ("files", (f"{i}-é.png", bytes([i]) * 50 + b"\r\n--", "image/png")) for i in range(files)
    ]
    request = httpx.Request("POST", "http://x/predict/batch", files=uploads)
    body = request.read()
    content_type = request.headers["content-type"].encode()
    fast = split_files(body, content_type, "files", 8)
    assert fast is not None and len(fast) == files
    assert fast == _starlette(body, content_type, "files", 8)


def test_a_curl_style_body_takes_the_fast_path() -> None:
    boundary = b"------------------------d74496d66958873e"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.png"'
        b"\r\nContent-Type: image/png\r\n\r\nPNGDATA\r\n--" + boundary + b"--\r\n"
    )
    content_type = b"multipart/form-data; boundary=" + boundary
    assert split_files(body, content_type, "file", 1) == [("a.png", b"PNGDATA")]


@pytest.mark.parametrize(
    "content_type",
    [
        b"multipart/form-data",
        b"multipart/form-data; boundary=",
        b"text/plain; boundary=x",
        b"multipart/form-data; charset=utf-8; boundary=x",
        b'multipart/form-data; boundary="x',
    ],
)
def test_unusual_content_types_are_left_to_starlette(content_type: bytes) -> None:
    assert boundary_of(content_type) is None
