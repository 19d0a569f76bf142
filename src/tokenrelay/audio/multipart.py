"""``multipart/form-data`` (RFC 7578) for bodies already read whole (and size-checked) by the transport.

Parsing: the boundary comes from the Content-Type; each part's headers are parsed by the standard
library's ``email`` parser (quoted and RFC 2231-encoded ``name``/``filename`` parameters included). What
is malformed is a 400 that says so; the limits on parts and field sizes keep a hostile body from costing
more than its (already bounded) size. Encoding builds a body to send upstream.
"""

from __future__ import annotations

import secrets
from email.message import Message
from email.parser import BytesHeaderParser

from tokenrelay.errors import GatewayError, invalid

MAX_PARTS = 64
MAX_FIELD_BYTES = 64 * 1024  # a form field that is not a file

_headers = BytesHeaderParser()


class Part:
    __slots__ = ("content_type", "data", "filename", "name")

    def __init__(self, name: str, data: bytes, filename: str | None, content_type: str | None) -> None:
        self.name = name
        self.data = data
        self.filename = filename
        self.content_type = content_type

    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(f"Form field '{self.name}' is not UTF-8 text.", param=self.name) from None


def boundary_of(content_type: bytes | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; 400 (415 for another type) otherwise."""
    if content_type is None:
        raise GatewayError(415, "The request body must be multipart/form-data (no Content-Type was sent).")
    msg = Message()
    msg["content-type"] = content_type.decode("latin-1")
    if msg.get_content_type() != "multipart/form-data":
        raise GatewayError(
            415, f"The request body must be multipart/form-data, not {msg.get_content_type()}."
        )
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise invalid("The multipart/form-data Content-Type has no valid boundary.", code="invalid_multipart")
    return boundary.encode("latin-1")


def parse(body: bytes, boundary: bytes) -> list[Part]:
    """The parts of a whole ``multipart/form-data`` body, in order."""
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise invalid("The multipart body does not contain its boundary.", code="invalid_multipart")
    parts: list[Part] = []
    pos = start + len(delimiter)
    separator = b"\r\n" + delimiter
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter (an epilogue after it is ignored)
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise invalid("The multipart body is cut off or malformed.", code="invalid_multipart")
        head_start = line_end + 2
        head_end = body.find(b"\r\n\r\n", head_start - 2)
        if head_end < 0:
            raise invalid("A multipart part has no end of headers.", code="invalid_multipart")
        end = body.find(separator, head_end + 4)
        if end < 0:
            raise invalid("The multipart body is cut off (no closing boundary).", code="invalid_multipart")
        if len(parts) >= MAX_PARTS:
            raise invalid(f"The form has more than {MAX_PARTS} parts.", code="invalid_multipart")
        headers = _headers.parsebytes(body[head_start : head_end + 4])
        name = headers.get_param("name", header="content-disposition")
        if headers.get_content_disposition() != "form-data" or not isinstance(name, str):
            raise invalid(
                "A multipart part has no Content-Disposition form-data name.", code="invalid_multipart"
            )
        filename = headers.get_filename()
        data = body[head_end + 4 : end]
        if filename is None and len(data) > MAX_FIELD_BYTES:
            raise invalid(f"Form field '{name}' is over {MAX_FIELD_BYTES} bytes.", param=name)
        content_type = headers.get("content-type")
        parts.append(Part(name, data, filename, str(content_type) if content_type else None))
        pos = end + len(separator)


def encode(fields: list[tuple[str, str]], files: list[Part]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its Content-Type."""
    boundary = "tokenrelay-" + secrets.token_hex(16)
    out: list[bytes] = []
    for name, value in fields:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'.encode())
        out.append(value.encode() + b"\r\n")
    for part in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(part.name)}"'
        head += f'; filename="{_quote(part.filename or "audio")}"\r\n'
        head += f"Content-Type: {part.content_type or 'application/octet-stream'}\r\n\r\n"
        out.append(head.encode())
        out.append(part.data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def _quote(value: str) -> str:
    # RFC 7578 4.2: percent-encode what would end the quoted string or the header line
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
