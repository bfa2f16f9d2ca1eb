# capworks producer image: `capworks enqueue`, `capworks events`, `capworks status`, `dlq`,
# `search`, and Flower (installed with the `flower` extra). CPU only. Build from the root:
#   docker build -f docker/producer.Dockerfile -t capworks-producer .
# The whole package is installed (CPU torch included): enqueue and events resolve the model's
# identity (revision, generation settings) to skip images this model already captioned.
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CAPWORKS_CACHE_DIR=/cache/capworks \
    MODELSCOPE_CACHE=/cache/modelscope

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    && pip install cython numpy "setuptools<81" wheel \
    && pip install --no-build-isolation "fairseq-fixed==0.12.3.1"

WORKDIR /opt/capworks
COPY pyproject.toml README.md ./
COPY schema schema
COPY producer producer
COPY workers workers
COPY capworks capworks
RUN pip install ".[flower]" && useradd --create-home --uid 1000 capworks \
    && mkdir -p /cache && chown capworks /cache
USER capworks
VOLUME /cache

# Healthy while Redis and the database answer (no worker runs here).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["capworks", "health"]
ENTRYPOINT ["capworks"]
CMD ["status"]
