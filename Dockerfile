# syntax=docker/dockerfile:1
# The talkingmachines server for NVIDIA GPUs: one serving group (master + score workers) per container.
#
#   docker build -t talkingmachines:0.1.0 .
#   docker build --build-arg FLASH_ATTN=1 -t talkingmachines:0.1.0-flash .   # compiles flash-attn (slow)
#   docker run --gpus all -p 8000:8000 -v $PWD/serve.toml:/etc/talkingmachines/serve.toml:ro \
#     -v /data/models:/models:ro -e TALKINGMACHINES_API_KEY=... talkingmachines:0.1.0 \
#     --config /etc/talkingmachines/serve.toml --preset talkingmachines-18b --score-workers 1 --device cuda ...
#
# torch's PyPI wheel brings its own CUDA 13 libraries (cuBLAS, cuDNN, NCCL), so the runtime image needs only
# the CUDA runtime base and a driver that supports CUDA 13.2 on the host. Every Python package is installed
# at the exact version in deploy/constraints.txt. A CPU image for local tries is deploy/Dockerfile.cpu.

ARG CUDA_VERSION=13.2.0
ARG UBUNTU=ubuntu24.04
# 1 builds flash-attn from source in a CUDA devel stage (the `flash` attention backend of workers/attention.py);
# 0 (default) skips it: the default SDPA backend needs nothing extra.
ARG FLASH_ATTN=0

# ---- the browser call page (web/ -> server/static/call), served by `serve` at /call ------------------------
FROM node:20-bookworm-slim AS web
WORKDIR /build/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY web ./
RUN npm run build

# ---- the virtual environment: the package and its pinned dependencies ----------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS venv
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/constraints.txt deploy/constraints.txt
COPY pyproject.toml README.md ./
COPY proto proto
COPY workers workers
COPY engine engine
COPY frontends frontends
COPY decoder decoder
COPY server server
COPY --from=web /build/server/static/call server/static/call
COPY benchmarks benchmarks
COPY training training
COPY deploy deploy
# A regular (not editable) install: the image runs from site-packages, /src is not kept.
RUN pip install --constraint deploy/constraints.txt .

# ---- optional flash-attn, compiled against the venv's torch with the CUDA toolkit of the devel image ----
FROM venv AS flash-attn-0

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS flash-attn-1
ARG FLASH_ATTN_VERSION=2.8.3
# Parallel nvcc jobs; each needs several GB of RAM.
ARG MAX_JOBS=4
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates git \
    && rm -rf /var/lib/apt/lists/*
COPY --from=venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install ninja packaging \
    && MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

FROM flash-attn-${FLASH_ATTN} AS deps

# ---- the runtime image ---------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# tini is PID 1: it forwards SIGTERM to `talkingmachines serve` (a Python PID 1 would ignore it, and the
# graceful drain starts at SIGTERM) and reaps the rank processes the launcher starts.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=deps /opt/venv /opt/venv
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin talkingmachines \
    && mkdir -p /etc/talkingmachines /var/lib/talkingmachines/out /models \
    && chown talkingmachines:talkingmachines /var/lib/talkingmachines/out
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TALKINGMACHINES_HOST=0.0.0.0 \
    TALKINGMACHINES_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
# Checkpoints are mounted read-only under /models; nothing is ever downloaded at run time. Change the HTTP
# port with TALKINGMACHINES_PORT (not --port): the server and the HEALTHCHECK below both read it.
USER 10001:10001
WORKDIR /home/talkingmachines
EXPOSE 8000
# /healthz answers as soon as the process serves HTTP; loading the 18B weights takes minutes, hence the
# start period. Readiness (/readyz) is for the orchestrator's routing, not for this health check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('TALKINGMACHINES_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["/usr/bin/tini", "--", "talkingmachines", "serve"]
CMD ["--config", "/etc/talkingmachines/serve.toml"]
