"""Schemathesis hooks for leuknet's openapi.yaml, loaded by tests/schemathesis.rs
(SCHEMATHESIS_HOOKS=hooks, with this folder on PYTHONPATH).

JSON Schema cannot say "these bytes are an image", so schemathesis fills the `image` parts and
raw image bodies of POST /v1/classify with random bytes, which the server rightly refuses
(422 not_an_image / corrupt_image). To test the successful path too, `map_body` swaps the bytes
of about half of the generated bodies for small real PNGs: those requests reach the model and
their 200 answers (JSON or FHIR) are checked against the response schemas.

`filter_failure` drops exactly three kinds of "schema-valid request rejected" (ST202) findings
on POST /v1/classify, none the server's fault:
  - 422 not_an_image / corrupt_image for a body whose image bytes were random;
  - 400 bad_request "malformed multipart body" for a form with a generated field name holding a
    control character, which no multipart part header can carry (the server ignores unknown
    fields, so the schema allows them, but it cannot parse that header);
  - 400 invalid_identifier when `X-Accession-Id` / `X-Specimen-Id` and the multipart field of
    the same name were both generated with different values: the documented rule "given twice
    they must agree" spans a header and a body field, which OpenAPI cannot express.
Everything else fails the run.
"""

import struct
import zlib

import schemathesis

CLASSIFY = "/v1/classify"


def _png(width: int, height: int, seed: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + bytes(((x * 7 + y * 3 + seed) % 256, (x + seed) % 256, (y * 5) % 256)[c]
                        for x in range(width) for c in range(3))
        for y in range(height)
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# A few real images of different sizes, and the set of them to recognise them later.
REAL = [_png(w, h, s) for (w, h, s) in [(32, 32, 1), (48, 20, 2), (17, 64, 3)]]
REAL_SET = set(REAL)


def _is_classify(context) -> bool:
    op = getattr(context, "operation", None)
    return op is not None and op.path == CLASSIFY


def _as_bytes(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return None


def _images(body):
    """The image payloads of a classify body (multipart dict or raw bytes), or None."""
    if isinstance(body, dict):
        parts = body.get("image")
        if isinstance(parts, list):
            return parts
        return None
    if isinstance(body, (bytes, bytearray)):
        return [body]
    return None


@schemathesis.hook
def map_body(context, body):
    if not _is_classify(context):
        return body
    images = _images(body)
    if not images or not all(_as_bytes(p) is not None for p in images):
        return body
    # Deterministic: the same generated body always maps the same way.
    if sum(len(p) for p in images) % 2:
        return body
    if isinstance(body, dict):
        body = dict(body)
        body["image"] = [REAL[i % len(REAL)] for i in range(len(images))]
        return body
    return REAL[len(body) % len(REAL)]


def _control_char_field(body) -> bool:
    if not isinstance(body, dict):
        return False
    return any(
        isinstance(k, str) and any(ord(c) < 0x20 or ord(c) == 0x7F for c in k) for k in body
    )


def _all_real(body) -> bool:
    images = _images(body)
    return bool(images) and all(_as_bytes(p) in REAL_SET for p in images)


@schemathesis.hook
def filter_failure(context, failure, case, response):
    if getattr(failure, "code", None) != "ST202" or case.operation.path != CLASSIFY:
        return True
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except Exception:
        return True
    if code in ("not_an_image", "corrupt_image") and not _all_real(case.body):
        return False
    if code == "bad_request" and "malformed multipart body" in message and _control_char_field(case.body):
        return False
    if code == "invalid_identifier" and _identifiers_disagree(case):
        return False
    return True


def _identifiers_disagree(case) -> bool:
    if not isinstance(case.body, dict):
        return False
    headers = case.headers or {}
    for field, header in (("accession_id", "x-accession-id"), ("specimen_id", "x-specimen-id")):
        in_header = next((v for k, v in headers.items() if k.lower() == header), None)
        if field in case.body and in_header is not None and str(case.body[field]) != str(in_header):
            return True
    return False
