# capworks worker: one process per GPU on a CUDA runtime base. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t capworks-worker .
# No model weights are baked in: the ModelScope hub cache and capworks' offline checkpoints live
# in the /cache volume, so a new image reuses the downloaded model. To bake one in anyway:
#   --build-arg PRELOAD_MODEL=damo/ofa_image-caption_coco_distilled_en
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG PRELOAD_MODEL=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CAPWORKS_CACHE_DIR=/cache/capworks \
    MODELSCOPE_CACHE=/cache/modelscope

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The same order as scripts/install.sh: torch 2.13.0 first (here the CUDA build), then
# fairseq-fixed compiled against it without build isolation, then capworks itself.
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}" \
    && pip install cython numpy "setuptools<81" wheel \
    && pip install --no-build-isolation "fairseq-fixed==0.12.3.1"

WORKDIR /opt/capworks
COPY pyproject.toml README.md ./
COPY schema schema
COPY producer producer
COPY workers workers
COPY capworks capworks
RUN pip install . && useradd --create-home --uid 1000 capworks \
    && mkdir -p /cache && chown capworks /cache
USER capworks

# Written before VOLUME so that a new named volume starts with it.
RUN if [ -n "${PRELOAD_MODEL}" ]; then \
        python -c "from modelscope.hub.snapshot_download import snapshot_download as d; \
d('${PRELOAD_MODEL}')"; \
    fi
VOLUME /cache

# Unhealthy when this container's worker has not beaten for CAPWORKS_HEARTBEAT_STALE_S (a hung
# model thread) or Redis is unreachable; a database outage is waited out, so not checked here.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["capworks", "health", "--worker", "--no-database"]
ENTRYPOINT ["capworks"]
CMD ["worker", "--gpus", "all"]
