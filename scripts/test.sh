#!/usr/bin/env bash
# The whole test suite: install, then pytest against the real Redis, PostgreSQL and a SeaweedFS
# S3 server the tests start on 127.0.0.1. The shapes checkpoint is built on first use.
# Two passes: the tests that can share the machine run two at a time (pytest-xdist; most of
# their time is spent waiting on worker processes and servers), then the `serial` ones alone
# (they stop PostgreSQL, or compare timings), then the `train` ones in .venv-train. Arguments
# go to every pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Build the checkpoint once, before two processes would wait on its lock.
.venv/bin/python -c "from capworks.checkpoints.build import ensure_checkpoint; from capworks.schema.settings import get_settings; ensure_checkpoint('shapes', get_settings().checkpoint_dir)"
status=0
.venv/bin/python -m pytest -q -n "${CAPWORKS_TEST_PROCS:-2}" -m "not serial and not train" "$@" \
    || status=$?
serial=0
.venv/bin/python -m pytest -q -m serial "$@" || serial=$?
# The fine-tune tests (`train`) run in the train venv (torch 2.14.1 + torchvision, README
# "Fine-tuning"), built here on first use; in the main venv they would only skip.
train=0
bash scripts/install.sh --train
.venv-train/bin/python -m pytest -q -m train "$@" || train=$?
# 5: the arguments selected no test of that pass.
[ "$serial" = 5 ] && serial=0
[ "$status" = 5 ] && status=0
[ "$train" = 5 ] && train=0
exit $(( status || serial || train ))
