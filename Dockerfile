# syntax=docker/dockerfile:1
#
# leuknet-server on NVIDIA GPUs: ONNX Runtime 1.31.1 (onnxruntime-gpu wheel, CUDA 13 build) with
# the CUDA execution provider. Research use only; not a medical device.
#
#   docker build -t leuknet .
#   docker run --gpus all -p 8080:8080 -v "$PWD/models:/models:ro" leuknet
#
# The model is not baked in: mount a folder holding leuknet.json + leuknet.onnx at /models.
# Stages: builder (Rust, dependency layer cached apart from src/), ort (ONNX Runtime GPU .so files
# from PyPI), runtime (CUDA 13.0 + cuDNN 9 base, non-root, health check on /health/ready).

# ---- builder: the server binary ------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /build

# 1. Dependencies only. A dummy crate with the real manifest, lock file, build script and proto
#    builds every dependency into this layer, which stays cached until one of these files changes.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto/ proto/
# Every target the manifest names explicitly must exist for cargo to load it, so each [[bin]],
# [[test]], [[bench]] and [[example]] gets a `fn main(){}` stub, as does the server itself.
RUN set -eu; \
    mkdir -p src/bin; \
    : > src/lib.rs; \
    echo 'fn main() {}' > src/bin/leuknet-server.rs; \
    awk ' \
      /^\[\[(bin|test|bench|example)\]\]/ { kind = substr($0, 3, length($0) - 4); next } \
      /^\[/ { kind = ""; next } \
      kind != "" && $1 == "path" { split($0, a, "\""); print a[2]; next } \
      kind != "" && $1 == "name" { split($0, a, "\""); \
        dir = (kind == "bin") ? "src/bin" : (kind == "test") ? "tests" : (kind == "bench") ? "benches" : "examples"; \
        print dir "/" a[2] ".rs" } \
    ' Cargo.toml | while read -r stub; do \
      mkdir -p "$(dirname "$stub")"; [ -e "$stub" ] || echo 'fn main() {}' > "$stub"; \
    done; \
    cargo build --release --locked --bin leuknet-server; \
    rm -rf src

# 2. The crate itself, and openapi.yaml, which src/http embeds with include_str!. COPY keeps the
#    files' own mtimes, which can be older than the stub build, so touch them: cargo must see the
#    real sources as newer than the cached stub artefacts.
COPY openapi.yaml ./
# src/synthetic.rs embeds the font it draws text with (OOD measurements; Bitstream Vera licence).
COPY assets/fonts/DejaVuSans.ttf assets/fonts/DejaVuSans.ttf
COPY src/ src/
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin leuknet-server \
    && install -D -m 0755 target/release/leuknet-server /out/bin/leuknet-server

# ---- ort: ONNX Runtime GPU shared libraries from the PyPI wheel ---------------------------
FROM python:3.12-slim-bookworm AS ort
ARG ORT_VERSION=1.31.1
# sha256 of onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl (255.6 MB, CUDA 13.0).
ARG ORT_WHEEL_SHA256=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7
# 0 (default): the CUDA libraries the provider needs (cudart, cuBLAS, cuFFT, cuRAND, NVRTC, cuDNN 9)
# come from the nvidia/cuda cudnn-runtime base image below, which ships the same sonames.
# 1: also copy them from the PyPI nvidia wheels into /opt/leuknet/cuda (first on LD_LIBRARY_PATH),
# pinned to the CUDA 13.0 line so that a driver for CUDA 13.0 (>= 580) suffices.
ARG CUDA_LIBS_FROM_WHEELS=0
WORKDIR /dl
RUN set -eu; \
    pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 -d /dl "onnxruntime-gpu==${ORT_VERSION}"; \
    whl=$(ls /dl/onnxruntime_gpu-"${ORT_VERSION}"-*.whl); \
    echo "${ORT_WHEEL_SHA256}  ${whl}" | sha256sum -c -; \
    python -m zipfile -e "$whl" /x; \
    mkdir -p /out/lib /out/cuda; \
    for so in "libonnxruntime.so.${ORT_VERSION}" libonnxruntime_providers_shared.so \
              libonnxruntime_providers_cuda.so; do \
      cp "/x/onnxruntime/capi/$so" /out/lib/; \
    done; \
    ln -s "libonnxruntime.so.${ORT_VERSION}" /out/lib/libonnxruntime.so; \
    if [ "$CUDA_LIBS_FROM_WHEELS" = 1 ]; then \
      pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 -d /dl/cuda \
        nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 nvidia-cufft==12.0.0.61 \
        nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 nvidia-nvjitlink==13.0.88 \
        nvidia-cudnn-cu13==9.19.0.56; \
      for w in /dl/cuda/*.whl; do python -m zipfile -e "$w" /y; done; \
      cp -a /y/nvidia/cu13/lib/*.so* /y/nvidia/cudnn/lib/*.so* /out/cuda/; \
    fi; \
    rm -rf /dl /x /y

# ---- runtime -------------------------------------------------------------------------------
# CUDA 13.0.2 runtime + cuDNN 9 on Ubuntu 24.04 (glibc 2.39 >= bookworm's 2.36 the binary was
# linked against). Needs an NVIDIA driver for CUDA 13.0 (>= 580) and the NVIDIA container toolkit.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS runtime

# curl only for HEALTHCHECK (the base image purges its own); no other packages.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 leuknet \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin leuknet

COPY --from=builder /out/bin/leuknet-server /opt/leuknet/bin/leuknet-server
COPY --from=ort /out/lib/ /opt/leuknet/lib/
COPY --from=ort /out/cuda/ /opt/leuknet/cuda/

# libonnxruntime finds its providers next to itself; the CUDA provider has no RUNPATH, so the
# loader path names the ORT folder, the optional wheel libraries, then the base image's CUDA.
ENV LEUKNET_ORT_LIBRARY=/opt/leuknet/lib/libonnxruntime.so.1.31.1 \
    LEUKNET_ADDR=0.0.0.0:8080 \
    LEUKNET_MODEL_CARD=/models/leuknet.json \
    LEUKNET_DEVICE=auto \
    LEUKNET_LOG_FORMAT=json \
    LD_LIBRARY_PATH=/opt/leuknet/lib:/opt/leuknet/cuda:/usr/local/cuda/lib64:/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
WORKDIR /opt/leuknet
EXPOSE 8080
# Ready = model loaded and warmed, and not draining. The start period covers loading + warm-up.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/health/ready"]
# The server drains on SIGTERM (LEUKNET_DRAIN_TIMEOUT_MS, default 30 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/leuknet/bin/leuknet-server"]
