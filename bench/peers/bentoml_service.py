"""Peer 2: what a Python shop would pick. BentoML (one worker, adaptive batching) + ONNX
Runtime + Pillow.

POST /v1/classify with a raw image body (image/tiff, image/jpeg, ...) ->
{"request_id", "results": [ONE result in leuknet-server's shape]}; GET /readyz (BentoML's).

The API is BentoML's idiomatic batchable one, `classify(images: list[PIL.Image]) -> list[dict]`:
the dispatcher groups concurrent requests into one call (up to LEUKNET_PEER_MAX_BATCH, 8 like
leuknet-server's default) and the call decodes, resizes and runs the model for the batch.
BentoML's typed APIs take JSON or multipart, not a raw body, so a small ASGI middleware wraps
a raw image body into a one-part multipart form on the way in, and unwraps the one-element
list on the way out (one copy of the body; the cost is counted in the peer's figures).

  LEUKNET_PEER_CARD=.../leuknet.json bentoml serve bentoml_service:LeukNetPeer --port 8002
"""

from __future__ import annotations

import hashlib
import os
import typing as t
import uuid

import bentoml
from PIL.Image import Image as PILImage

import leuknet_peer as lp

MAX_BATCH = int(os.environ.get("LEUKNET_PEER_MAX_BATCH", "8"))
# The dispatcher answers 503 to requests it predicts will wait longer than this; the benchmark
# wants every request served (leuknet-server gets an equally long request timeout).
MAX_LATENCY_MS = int(os.environ.get("LEUKNET_PEER_MAX_LATENCY_MS", "300000"))
THREADS = int(os.environ.get("LEUKNET_PEER_THREADS") or 0) or (os.cpu_count() or 1)


class RawImageToMultipart:
    """ASGI middleware: raw `image/*` POST to /v1/classify -> multipart field `images`;
    response `[X]` -> `X`."""

    def __init__(self, app, **_options):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/v1/classify" \
                or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"]]
        ctype = next((v for k, v in headers if k == b"content-type"), b"")
        if not ctype.lower().startswith(b"image/"):
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        boundary = uuid.uuid4().hex.encode()
        body = b"".join([
            b"--", boundary, b"\r\nContent-Disposition: form-data; name=\"images\"; "
            b"filename=\"upload\"\r\nContent-Type: ", ctype, b"\r\n\r\n", *chunks,
            b"\r\n--", boundary, b"--\r\n"])
        headers = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"multipart/form-data; boundary=" + boundary),
                    (b"content-length", str(len(body)).encode())]
        sent = False

        async def new_receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        start: dict = {}
        parts: list[bytes] = []

        async def new_send(msg):
            if msg["type"] == "http.response.start":
                start.update(msg)
                return
            if msg["type"] == "http.response.body":
                parts.append(msg.get("body", b""))
                if msg.get("more_body"):
                    return
                out = b"".join(parts)
                if start.get("status") == 200 and out.startswith(b"[") and out.endswith(b"]"):
                    out = out[1:-1]
                hdrs = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                hdrs.append((b"content-length", str(len(out)).encode()))
                await send({**start, "headers": hdrs})
                await send({"type": "http.response.body", "body": out, "more_body": False})
                return
            await send(msg)

        await self.app(dict(scope, headers=headers), new_receive, new_send)


@bentoml.service(workers=1, traffic={"timeout": MAX_LATENCY_MS / 1000 + 60})
class LeukNetPeer:
    def __init__(self) -> None:
        self.model = lp.Model(threads=THREADS)

    @bentoml.api(route="/v1/classify", batchable=True, max_batch_size=MAX_BATCH,
                 max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: list[PILImage]) -> list[dict[str, t.Any]]:
        m = self.model
        t0 = lp.now_ms()
        tensors, infos = [], []
        for im in images:
            fp = getattr(im, "fp", None)
            digest = ""
            if fp is not None and hasattr(fp, "seek"):
                pos = fp.tell()
                fp.seek(0)
                digest = hashlib.sha256(fp.read()).hexdigest()
                fp.seek(pos)
            x, info = lp.preprocess_image(im, digest, draft=m.draft, resizer=m.resizer)
            tensors.append(x)
            infos.append(info)
        t1 = lp.now_ms()
        import numpy as np

        probs = m.infer(np.stack(tensors))
        t2 = lp.now_ms()
        decode_ms = (t1 - t0) / max(len(images), 1)
        return [{"request_id": lp.request_id(),
                 "results": [m.result(float(p), info, decode_ms, 0.0, t2 - t1)]}
                for p, info in zip(probs, infos)]


LeukNetPeer.add_asgi_middleware(RawImageToMultipart)
