"""CPU cost of Pillow's preprocessing paths, per input file (bench/preprocess runs it).

Usage: preprocess_pillow.py --iterations N [--min-seconds S] FILE...
       preprocess_pillow.py --serve   (stdin: one `PATH ITERATIONS FILE` per line, e.g.
                                       `draft 20 a.jpg`; one JSON line back for each)
Prints one JSON object per (file, path) on stdout:
  {"file", "path", "iterations", "cpu_ms_median", "cpu_ms_p10", "cpu_ms_p90", "cpu_ms_mean",
   "wall_ms_median", "width", "height", "format", "decoded": [w, h]}

Paths (each ends in a 3x224x224 f32 array in [0, 1], C-contiguous, like leuknet-server's tensor):
  plain   the straightforward path: Image.open, convert("RGB"), resize((224, 224), BILINEAR),
          numpy / 255, transpose to CHW
  draft   Pillow's best path: the same after im.draft("RGB", (224, 224)), i.e. JPEG DCT-domain
          downscaling by the largest factor 1/2, 1/4 or 1/8 that keeps both sides >= 224 (a
          no-op for other formats and for JPEGs already smaller than 2x224)
  peer    the pipeline of the bench/run peers (bench/peers/leuknet_peer.py): draft by the
          server's scale rule, RGB, fast_image_resize Convolution(Bilinear) via cykooz-resizer

CPU time is time.process_time() (user + system CPU of the whole process, every thread), read
around each single call; the file's bytes are read into memory once, before timing. Run it on a
quiet machine; the first call per file and path is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import leuknet_peer  # noqa: E402

SIZE = 224


def plain(body: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(body))
    im = im.convert("RGB")
    im = im.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def draft(body: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(body))
    im.draft("RGB", (SIZE, SIZE))
    im = im.convert("RGB")
    im = im.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def peer(body: bytes) -> np.ndarray:
    tensor, _ = leuknet_peer.preprocess_image(Image.open(io.BytesIO(body)), "", True, "fir")
    return tensor


PATHS = {"plain": plain, "draft": draft, "peer": peer}


def decoded_size(body: bytes, path: str) -> list[int]:
    im = Image.open(io.BytesIO(body))
    if path == "draft":
        im.draft("RGB", (SIZE, SIZE))
    elif path == "peer" and im.format == "JPEG":
        r = leuknet_peer.jpeg_reduction(*im.size)
        if r > 1:
            im.draft("RGB", (im.size[0] // r, im.size[1] // r))
    im.load()
    return list(im.size)


def measure(body: bytes, fn, iterations: int, min_seconds: float) -> dict:
    out = fn(body)  # warm-up (and shape check)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == np.float32, out.shape
    cpu, wall = [], []
    started = time.perf_counter()
    while len(cpu) < iterations or time.perf_counter() - started < min_seconds:
        c0, w0 = time.process_time(), time.perf_counter()
        fn(body)
        c1, w1 = time.process_time(), time.perf_counter()
        cpu.append((c1 - c0) * 1000.0)
        wall.append((w1 - w0) * 1000.0)
    q = statistics.quantiles(cpu, n=10) if len(cpu) >= 2 else [cpu[0]] * 9
    return {
        "iterations": len(cpu),
        "cpu_ms_median": round(statistics.median(cpu), 4),
        "cpu_ms_p10": round(q[0], 4),
        "cpu_ms_p90": round(q[-1], 4),
        "cpu_ms_mean": round(statistics.fmean(cpu), 4),
        "wall_ms_median": round(statistics.median(wall), 4),
    }


def row_for(path: str, body: bytes, name: str, iterations: int, min_seconds: float) -> dict:
    with Image.open(io.BytesIO(body)) as im:
        width, height, fmt = im.size[0], im.size[1], (im.format or "").lower()
    row = {"file": path, "path": name, "width": width, "height": height, "format": fmt,
           "decoded": decoded_size(body, name)}
    row.update(measure(body, PATHS[name], iterations, min_seconds))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--min-seconds", type=float, default=0.0)
    ap.add_argument("--paths", default="plain,draft,peer")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    if args.serve:
        bodies: dict[str, bytes] = {}
        for line in sys.stdin:
            name, n, path = line.strip().split(" ", 2)
            if path not in bodies:
                with open(path, "rb") as f:
                    bodies[path] = f.read()
            print(json.dumps(row_for(path, bodies[path], name, int(n), 0.0)), flush=True)
        return
    for path in args.files:
        with open(path, "rb") as f:
            body = f.read()
        for name in args.paths.split(","):
            print(json.dumps(row_for(path, body, name, args.iterations, args.min_seconds)),
                  flush=True)


if __name__ == "__main__":
    main()
