"""Peer 1: the usual hand-rolled Python service. FastAPI + uvicorn (one worker process, one
model copy) + ONNX Runtime + Pillow.

POST /v1/classify with a raw image body (image/tiff, image/jpeg, image/png, image/bmp) ->
{"request_id", "results": [ONE result in leuknet-server's shape]}. GET /health/ready.

Decoding and resizing run on Starlette's thread pool (Pillow releases the GIL, so requests
overlap); model runs are serialised by a lock, one image per run (no batching), with
intra-op threads = LEUKNET_PEER_THREADS (default: cores), so that concurrent requests do not
each ask ONNX Runtime for every core at once.

  LEUKNET_PEER_CARD=.../leuknet.json uvicorn fastapi_app:app --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import threading

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

import leuknet_peer as lp

app = FastAPI(title="leuknet FastAPI peer")
model = lp.Model()
run_lock = threading.Lock()


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _classify(body: bytes) -> dict:
    t0 = lp.now_ms()
    x, info = lp.preprocess_bytes(body, draft=model.draft, resizer=model.resizer)
    t1 = lp.now_ms()
    with run_lock:
        t2 = lp.now_ms()
        prob = float(model.infer(x[None])[0])
    t3 = lp.now_ms()
    return model.result(prob, info, t1 - t0, t2 - t1, t3 - t2)


@app.post("/v1/classify")
async def classify(request: Request):
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not ctype.startswith("image/"):
        return _error(415, "unsupported_media_type", "send a raw image body (image/*)")
    body = await request.body()
    try:
        result = await run_in_threadpool(_classify, body)
    except lp.BadImage as e:
        return _error(422, "corrupt_image", str(e))
    return {"request_id": lp.request_id(), "results": [result]}


@app.get("/health/ready")
async def ready():
    return {"status": "ready"}
