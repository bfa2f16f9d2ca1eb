#!/usr/bin/env bash
# The whole test suite: install, then pytest against the real Redis, PostgreSQL and a SeaweedFS
# S3 server the tests start on 127.0.0.1. The shapes checkpoint is built on first use.
# Three passes: the tests that can share the machine run two at a time (pytest-xdist; most of
# their time is spent waiting on worker processes and servers), then the `serial` ones one at a
# time (they stop PostgreSQL, or compare timings) with the `farm` ones beside them and the
# `quiet` ones alone after both, then the `train` ones in .venv-train with the memory soak
# beside them (it asserts memory, not time).
# Arguments go to every pass. Each step's time is printed, so a slow CI run says where it went.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
took() {
    local s=$((SECONDS - started))
    echo "test.sh: $1 took $((s / 60)) min $((s % 60)) s" >&2
    started=$SECONDS
}
bash scripts/install.sh
took "install"
# Build the checkpoint once, before two processes would wait on its lock.
.venv/bin/python -c "from capworks.checkpoints.build import ensure_checkpoint; from capworks.schema.settings import get_settings; ensure_checkpoint('shapes', get_settings().checkpoint_dir)"
took "the shapes checkpoint"
# The fine-tune venv (`train` pass) installs beside the first pass, which mostly waits on worker
# processes and servers: unpacking torch 2.14.1's 5.5 GB is disk work, minutes saved.
train_log=$(mktemp)
bash scripts/install.sh --train >"$train_log" 2>&1 &
train_install=$!
status=0
.venv/bin/python -m pytest -q -n "${CAPWORKS_TEST_PROCS:-2}" -m "not serial and not train" "$@" \
    || status=$?
took "the parallel pass"
# The serial tests in two lanes side by side, each one test at a time: the farm's (hosts in
# namespaces with a Redis, a PostgreSQL and an image store of their own) and the rest (they stop
# the machine's shared Redis and PostgreSQL, which the farm never uses). Most of both lanes'
# time is outages and leases waited out. The `quiet` ones (a rate against a clean run's) run
# after both lanes, alone: the other lane's bursts failed one at 0.64 of its 0.65 floor.
farm_log=$(mktemp)
.venv/bin/python -m pytest -q -m "serial and farm and not quiet" "$@" >"$farm_log" 2>&1 &
farm_run=$!
serial=0
.venv/bin/python -m pytest -q -m "serial and not farm and not soak and not quiet" "$@" \
    || serial=$?
farm=0
wait "$farm_run" || farm=$?
echo "test.sh: the farm lane, beside the serial pass:" >&2
cat "$farm_log" >&2
rm -f "$farm_log"
quiet=0
.venv/bin/python -m pytest -q -m "serial and quiet" "$@" || quiet=$?
took "the serial pass, the farm lane and the quiet tests"
soak_log=$(mktemp)
.venv/bin/python -m pytest -q -m soak "$@" >"$soak_log" 2>&1 &
soak_run=$!
# The fine-tune tests (`train`) run in the train venv (torch 2.14.1 + torchvision, README
# "Fine-tuning"); in the main venv they would only skip.
train=0
if wait "$train_install"; then
    .venv-train/bin/python -m pytest -q -m train "$@" || train=$?
else
    cat "$train_log" >&2
    echo "test.sh: installing the train venv failed" >&2
    train=1
fi
rm -f "$train_log"
soak=0
wait "$soak_run" || soak=$?
echo "test.sh: the soak, beside the train pass:" >&2
cat "$soak_log" >&2
rm -f "$soak_log"
took "the train pass and the soak"
# 5: the arguments selected no test of that pass.
[ "$serial" = 5 ] && serial=0
[ "$farm" = 5 ] && farm=0
[ "$quiet" = 5 ] && quiet=0
[ "$status" = 5 ] && status=0
[ "$train" = 5 ] && train=0
[ "$soak" = 5 ] && soak=0
exit $(( status || serial || farm || quiet || train || soak ))
