#!/usr/bin/env bash
# The GPU benchmark recipe for a lent GPU host (issue 4). NOT YET RUN: no GPU was lent to the
# session that wrote it; the first GPU session should run it and fix what it finds.
#
# The GPU host has Python 3.12, a CUDA torch (2.11), transformers 5 (which the OFA tokenizer
# cannot import) and no package index. So:
#   here:  bash bench/gpu_host.sh fetch   # wheels for py3.12 into .whl/ (git-ignored)
#   there: bash bench/gpu_host.sh run     # (device tool: carry .whl) install them into
#                                         # /tmp/site, build fairseq-fixed from its sdist without
#                                         # build isolation, then run the benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
# transformers 4.x needs huggingface-hub < 1 and tokenizers <= 0.22; the host has newer ones.
WHEELS=(transformers==4.57.6 tokenizers==0.22.1 huggingface-hub==0.36.0 modelscope==1.40.2
        modelscope-hub==0.5.1 addict simplejson pydantic-settings==2.16.3 lemminflect==0.2.3
        hydra-core==1.3.2 omegaconf==2.3.0 bitarray)
SDISTS=(fairseq-fixed==0.12.3.1 antlr4-python3-runtime==4.9.3)

case "${1:-}" in
fetch)
    mkdir -p "$WHL"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHL" "${WHEELS[@]}"
    python3 -m pip download --no-deps --no-binary=:all: -d "$WHL" "${SDISTS[@]}"
    du -sh "$WHL"
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHL"/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    for sdist in "$WHL"/*.tar.gz; do
        python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site "$sdist"
    done
    python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
    mkdir -p "${OUT:-/tmp/out}"
    python3 bench/engine.py --model tiny-random --device cuda --compare \
        --dtypes float32,float16,bfloat16 --batch-sizes 1,8,32,64,128 --images 256 \
        | tee "${OUT:-/tmp/out}/engine-tiny.txt"
    python3 bench/engine.py --model shapes --device cuda --compare \
        --dtypes float32,float16,bfloat16 --batch-sizes 64 --images 512 \
        | tee "${OUT:-/tmp/out}/engine-shapes.txt"
    python3 bench/engine.py --model large-random --device cuda --compare \
        --dtypes float32,float16 --batch-sizes 1,8,32,64 --images 128 \
        | tee "${OUT:-/tmp/out}/engine-large.txt"
    ;;
*)
    echo "usage: bash bench/gpu_host.sh fetch|run" >&2
    exit 2
    ;;
esac
