"""What both Python peers share: the model card, the ONNX Runtime session, Pillow
preprocessing that reproduces leuknet-server's (src/preprocess.rs), and the response JSON.

Environment (set by bench/run, or by hand):
  LEUKNET_PEER_CARD     model card (leuknet.json); the ONNX file is read from beside it
  LEUKNET_PEER_THREADS  ONNX Runtime intra-op threads (default: os.cpu_count())
  LEUKNET_PEER_DRAFT    1 (default): JPEG DCT-domain downscaling via Pillow's draft(), with the
                        server's scale rule; 0: decode JPEGs at full size (Pillow's plain path)
  LEUKNET_PEER_RESIZER  fir (default): cykooz-resizer, the Python binding of fast_image_resize,
                        Convolution(Bilinear), the server's resizer (bit-exact on TIFF cells);
                        pillow: Image.resize(BILINEAR) (also antialiased, but rounds differently:
                        +-1 on some pixels, which this random-weight fixture turns into ~1e-3)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid

import numpy as np
import onnxruntime as ort
from cykooz_resizer import FilterType, ImageData, PixelType, ResizeAlg, ResizeOptions, Resizer
from PIL import Image

SIZE = 224
FORMATS = {"JPEG": "jpeg", "PNG": "png", "TIFF": "tiff", "BMP": "bmp"}


class BadImage(ValueError):
    """The upload is not an image Pillow can decode (the peers answer 422)."""


def _env_threads() -> int:
    return int(os.environ.get("LEUKNET_PEER_THREADS") or 0) or (os.cpu_count() or 1)


class Model:
    """The card plus one ONNX Runtime session on the CPU."""

    def __init__(self, card_path: str | None = None, threads: int | None = None):
        card_path = card_path or os.environ["LEUKNET_PEER_CARD"]
        with open(card_path) as f:
            self.card = json.load(f)
        onnx_path = os.path.join(os.path.dirname(os.path.abspath(card_path)), self.card["onnx_file"])
        self.threads = threads or _env_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.card["input"]["tensor"]["name"]
        self.output_name = self.card["probability_output"]
        self.threshold = float(self.card["decision"]["threshold"])
        self.draft = os.environ.get("LEUKNET_PEER_DRAFT", "1") != "0"
        self.resizer = os.environ.get("LEUKNET_PEER_RESIZER", "fir")
        if self.resizer not in ("fir", "pillow"):
            raise ValueError(f"LEUKNET_PEER_RESIZER must be fir or pillow, not {self.resizer}")
        self.model_ref = {
            "name": self.card["name"],
            "version": self.card["version"],
            "sha256": self.card["sha256"],
        }

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """NCHW f32 in [0, 1] -> probabilities, shape (N,)."""
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def result(self, prob: float, info: dict, decode_ms: float, queue_ms: float,
               inference_ms: float) -> dict:
        """One entry of `results`, in leuknet-server's shape."""
        return {
            "label": self.card["classes"]["positive"] if prob >= self.threshold
            else self.card["classes"]["negative"],
            "probability": prob,
            "threshold": self.threshold,
            "model": self.model_ref,
            "execution_provider": "cpu",
            "timings": {"decode_ms": decode_ms, "queue_ms": queue_ms, "inference_ms": inference_ms},
            "image": info,
            "disclaimer": self.card.get("disclaimer", ""),
        }


def request_id() -> str:
    return uuid.uuid4().hex


def _idct_scaled(side: int, s: int) -> int:
    return -(-side * s // 8)


def jpeg_reduction(width: int, height: int, size: int = SIZE) -> int:
    """leuknet-server's JPEG scale rule (src/preprocess.rs, jpeg_idct_scale): the smallest
    s/8 (s in 1, 2, 4) keeping both decoded sides >= min(size, side); returned as Pillow's
    reduction factor 8/s (1 = full size)."""
    tw, th = min(size, width), min(size, height)
    for s in (1, 2, 4):
        if _idct_scaled(width, s) >= tw and _idct_scaled(height, s) >= th:
            return 8 // s
    return 1


def open_image(data: bytes | io.BytesIO) -> Image.Image:
    try:
        return Image.open(data if isinstance(data, io.BytesIO) else io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any decoder error is the client's
        raise BadImage(f"not a supported image: {e}") from e


_FIR_OPTIONS = ResizeOptions(resize_alg=ResizeAlg.convolution(FilterType.bilinear))


def resize_fir(im: Image.Image) -> np.ndarray:
    """RGB Pillow image -> 224x224x3 u8 with fast_image_resize Convolution(Bilinear), as the
    server does (one Resizer per call: it holds scratch buffers and is not shared across
    threads)."""
    src = ImageData(im.width, im.height, PixelType.U8x3, im.tobytes())
    dst = ImageData(SIZE, SIZE, PixelType.U8x3)
    Resizer().resize(src, dst, _FIR_OPTIONS)
    return np.frombuffer(dst.get_buffer(), dtype=np.uint8).reshape(SIZE, SIZE, 3)


def preprocess_image(im: Image.Image, sha256: str, draft: bool = True,
                     resizer: str = "fir") -> tuple[np.ndarray, dict]:
    """An opened (not yet loaded) Pillow image -> (3x224x224 f32 in [0, 1], image info).

    Same steps as the server: JPEG DCT-domain downscaling by the server's rule (draft), RGB,
    squash to 224x224 with the antialiased bilinear (triangle) filter, v / 255, CHW."""
    width, height = im.size
    fmt = FORMATS.get(im.format or "", (im.format or "unknown").lower())
    try:
        if draft and im.format == "JPEG":
            r = jpeg_reduction(width, height)
            if r > 1:
                # Pillow picks the largest r' in (8, 4, 2, 1) with r' <= min(W // w, H // h);
                # asking for (W // r, H // r) makes that exactly r.
                im.draft("RGB", (width // r, height // r))
        im = im.convert("RGB")
        if resizer == "fir":
            arr = resize_fir(im)
        else:
            arr = np.asarray(im.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise BadImage(f"corrupt, truncated or unsupported image: {e}") from e
    tensor = (arr.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)
    info = {"width": width, "height": height, "format": fmt, "sha256": sha256}
    return np.ascontiguousarray(tensor), info


def preprocess_bytes(body: bytes, draft: bool = True, resizer: str = "fir") -> tuple[np.ndarray, dict]:
    if not body:
        raise BadImage("empty upload: no image bytes")
    return preprocess_image(open_image(body), hashlib.sha256(body).hexdigest(), draft, resizer)


def now_ms() -> float:
    return time.perf_counter() * 1000.0
