#!/usr/bin/env bash
# The whole test suite: install, then pytest against the real Redis, PostgreSQL and a SeaweedFS
# S3 server the tests start on 127.0.0.1. The shapes checkpoint is built on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
