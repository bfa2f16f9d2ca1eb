#!/usr/bin/env bash
# The GPU benchmark recipe for a lent GPU host (issue 4). First run on a GPU on 2026-12-05 (one
# H100: figures in BENCHMARKS.md, raw outputs in bench/gpu_results/2026-12-05-h100/; the
# large-random float16 reference step failed in ModelScope's generator). It was prepared and
# rehearsed on 2026-12-04, when new device loans were paused before its one run. What
# that session fixed, from a rehearsal of `run` on a CPU machine (Python 3.11, torch 2.13 CPU,
# the host's transformers 5 / huggingface_hub 2.x / tokenizers 0.23, accelerate, scikit-learn and
# no pydantic; the cp312 wheels checked under Python 3.12.1, with no torch there):
#   - wheels the import chain needs that the host lacks: pydantic (+ core, annotated-types,
#     typing-inspection, typing-extensions), python-dotenv, cryptography + cffi + pycparser
#     (modelscope-hub imports cryptography), and for `capworks caption`: sqlalchemy, alembic,
#     mako, boto3/botocore/s3transfer/jmespath, redis, celery, kombu, billiard, vine, amqp, tzlocal;
#     versions as the project's .venv resolves them (huggingface-hub 0.36.2, tokenizers 0.22.2).
#   - botocore's wheel is rewritten without its service models but s3's and sts's (16.9 -> 0.8 MB),
#     so that tree + wheels fit the 64 MiB that travels.
#   - sdists are built with PYTHONPATH unset: with /tmp/site first, setuptools' egg_info loaded
#     another distribution's entry point against the carried (older) huggingface_hub and failed.
#   - fairseq-fixed: its compiled parts (libbleu, libnat, libbase, Cython data utils) are not on
#     the OFA inference path and its build took 2 min 28 s on 2 cores in the rehearsal (the
#     tiny-random bench passed with the plain source), so its source is copied into /tmp/site
#     first; the sdist build (CUDA_HOME unset: CPU extensions only, as on the CI machine) runs last,
#     timed, as a check only.
#   - `shapes` is not run: it is not cached on a fresh machine (training takes 6-10 minutes) and
#     its weights (18.2M parameters, about 70 MiB) do not fit beside the wheels. large-random is
#     built there from its seed (ensure_checkpoint, about 20 s), not carried (1.9 GB).
#   - every step has a time limit under one overall deadline, writes $OUT/<step>.txt, and the
#     heavy steps run last, so that what ran survives a timeout.
#
# The GPU host has Python 3.12, a CUDA torch (2.11), transformers 5 (which the OFA tokenizer
# cannot import) and no package index. So:
#   here:  bash bench/gpu_host.sh fetch   # wheels for py3.12 into .whl/ (git-ignored)
#   there: bash bench/gpu_host.sh run     # (device tool: carry .whl) install them into
#                                         # /tmp/site, then run the benchmarks
# Tree + .whl: 2.5 + 50.3 MB. Planned device call: command `GPU_RUN_SECONDS=400 bash
# bench/gpu_host.sh run`, carry [".whl"], timeout_s 450 (steps past the deadline are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
# transformers 4.x needs huggingface-hub < 1 and tokenizers <= 0.23.0; the host has newer ones.
WHEELS=(transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2 modelscope==1.40.2
        modelscope-hub==0.5.1 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
        addict==2.4.0 simplejson==4.3.0 lemminflect==0.2.3
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 pydantic-settings==2.16.3 python-dotenv==1.2.4
        hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3
        sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3
        boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
        redis==8.2.0 celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2
        tzlocal==5.4.5)
SDISTS=(fairseq-fixed==0.12.3.1 antlr4-python3-runtime==4.9.3)

trim_botocore() {  # keep the service models of s3 and sts only, and RECORD consistent
    python3 - "$WHL"/botocore-*.whl <<'EOF'
import re, sys, zipfile
path = sys.argv[1]
drop = re.compile(r"^botocore/data/(?!(s3|sts)/)[^/]+/")
with zipfile.ZipFile(path) as src:
    items = [(i, src.read(i)) for i in src.infolist() if not drop.match(i.filename)]
out = []
for info, data in items:
    if info.filename.endswith(".dist-info/RECORD"):
        lines = data.decode().splitlines()
        data = ("\n".join(l for l in lines if not drop.match(l)) + "\n").encode()
    out.append((info, data))
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
    for info, data in out:
        dst.writestr(info, data)
print(f"{path}: {len(out)} files kept")
EOF
}

case "${1:-}" in
fetch)
    mkdir -p "$WHL"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
        -d "$WHL" "${WHEELS[@]}"
    trim_botocore
    # fairseq-fixed's metadata step imports torch: run pip from an environment that has it.
    "${FETCH_PYTHON:-.venv/bin/python}" -m pip download --no-deps --no-build-isolation \
        --no-binary=fairseq-fixed,antlr4-python3-runtime -d "$WHL" "${SDISTS[@]}"
    du -sh "$WHL"
    ;;
run)
    OUT=${OUT:-/tmp/out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1 CAPWORKS_CACHE_DIR=/tmp/capworks-cache
    deadline=$(($(date +%s) + ${GPU_RUN_SECONDS:-440}))
    # step NAME CAP CMD...: run CMD under min(CAP, time left), output teed to $OUT/NAME.txt.
    step() {
        local name=$1 cap=$2 left rc=0 t0
        shift 2
        left=$((deadline - $(date +%s)))
        if [ "$left" -lt 20 ]; then echo "=== $name: skipped, ${left} s left"; return 0; fi
        [ "$cap" -gt "$left" ] && cap=$left
        echo "=== $name (limit ${cap} s) $(date -u +%T)"
        t0=$(date +%s)
        timeout "$cap" "$@" 2>&1 | tee -a "$OUT/$name.txt" || rc=$?
        echo "=== $name: rc $rc, $(($(date +%s) - t0)) s" | tee -a "$OUT/$name.txt"
    }
    {
        date -u
        nvidia-smi || true
        python3 -c "import sys, torch; print(sys.version); print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name())" || true
        t0=$(date +%s)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target /tmp/site "$WHL"/*.whl
        # antlr4 (pure Python) from its sdist; PYTHONPATH unset (see the header).
        env -u PYTHONPATH python3 -m pip install -q --no-index --no-deps --no-build-isolation \
            --no-compile --target /tmp/site "$WHL"/antlr4-python3-runtime-*.tar.gz
        mkdir -p /tmp/fairseq-src
        tar xzf "$WHL"/fairseq_fixed-*.tar.gz -C /tmp/fairseq-src
        cp -r /tmp/fairseq-src/fairseq_fixed-*/fairseq /tmp/fairseq-src/fairseq_fixed-*/fairseq_cli \
            /tmp/site/
        echo "installed in $(($(date +%s) - t0)) s"
    } 2>&1 | tee "$OUT/env.txt"
    export PYTHONPATH=/tmp/site:$PWD
    python3 -c "import transformers, tokenizers, huggingface_hub, modelscope, pydantic, \
pydantic_settings, sqlalchemy; print('transformers', transformers.__version__, 'tokenizers', \
tokenizers.__version__, 'hub', huggingface_hub.__version__, 'modelscope', modelscope.__version__, \
'pydantic', pydantic.__version__, 'sqlalchemy', sqlalchemy.__version__)" 2>&1 | tee -a "$OUT/env.txt"

    step engine-tiny 170 python3 bench/engine.py --model tiny-random --device cuda --compare \
        --dtypes float32,float16,bfloat16 --batch-sizes 1,8,32,128 --images 128
    cat >/tmp/caption_check.sh <<'EOS'
set -o pipefail
python3 -c "import sys; sys.path.insert(0, 'bench'); from engine import synthetic_images
import pathlib; d = pathlib.Path('/tmp/capimgs'); d.mkdir(exist_ok=True)
for i, b in enumerate(synthetic_images(64, 1)): (d / f'{i:03d}.jpg').write_bytes(b)"
t0=$(date +%s%N)
python3 -m capworks.cli caption /tmp/capimgs --db sqlite:////tmp/capworks-gpu.db \
    --model tiny-random --device cuda --batch-size 32 --json --no-progress >/tmp/caption.jsonl
rc=$?
echo "capworks caption: rc $rc, wall $(( ($(date +%s%N) - t0) / 1000000 )) ms for $(ls /tmp/capimgs | wc -l) images"
head -c 600 /tmp/caption.jsonl; echo
python3 -c "import sqlite3; c = sqlite3.connect('/tmp/capworks-gpu.db')
print('rows: images', c.execute('select count(*) from images').fetchone()[0],
      'captions', c.execute('select count(*) from captions').fetchone()[0])"
exit $rc
EOS
    step caption 60 bash /tmp/caption_check.sh
    step devprep 45 python3 bench/device_preprocess.py --model tiny-random --images 64 \
        --device cuda
    # large-random (472,977,152 parameters, 1.9 GB) from its seed; about 20 s on 2 CPU cores.
    step engine-large 90 python3 -c "import time; t = time.time(); \
from capworks.checkpoints.build import ensure_checkpoint; from capworks.schema.settings import get_settings; \
print(ensure_checkpoint('large-random', get_settings().checkpoint_dir), \
f'built in {time.time() - t:.1f} s')"
    step engine-large 200 python3 bench/engine.py --model large-random --device cuda --compare \
        --dtypes float32,float16 --batch-sizes 1,8,32 --images 64
    step engine-large 50 python3 bench/engine.py --model large-random --device cuda \
        --generator fast --dtypes float32 --autocast float16 --batch-sizes 8,32 --images 64
    # The recipe's sdist build, as a check: CPU extensions only (CUDA_HOME unset).
    step fairseq-build 150 env -u PYTHONPATH -u CUDA_HOME MAX_JOBS=16 python3 -m pip wheel -q \
        --no-index --no-deps --no-build-isolation -w /tmp/fairseq-wheel "$WHL"/fairseq_fixed-*.tar.gz
    ls -la /tmp/fairseq-wheel 2>&1 | tee -a "$OUT/fairseq-build.txt"
    ;;
*)
    echo "usage: bash bench/gpu_host.sh fetch|run" >&2
    exit 2
    ;;
esac
