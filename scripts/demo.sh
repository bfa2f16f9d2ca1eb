#!/usr/bin/env bash
# The main job on embedded defaults: install, build the shapes checkpoint if missing, caption
# generated sample images into capworks-demo/captions.db and print them as a table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/capworks demo "$@"
