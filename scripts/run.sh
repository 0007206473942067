#!/usr/bin/env bash
# THE main job: sets up what is missing (virtual environment, package, Fashion-MNIST from the
# Debian package where the system allows), then trains configs/default.py (joint 2-bit weights,
# 2-bit activations, 4X blocks) and prints accuracy, memory and compression.
# Usage: bash scripts/run.sh [CONFIG] [WORKDIR] [--config.FIELD=VALUE ...]
#   CONFIG defaults to configs/default.py and WORKDIR to runs/<CONFIG's name>; the arguments
#   from the first one starting with '-' go to experiments.train, e.g.
#   bash scripts/run.sh --config.quant.w_bits=3 --workdir=runs/w3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG=configs/default.py
WORKDIR=""
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  CONFIG="$1"
  shift
  if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    WORKDIR="$1"
    shift
  fi
fi
if [ ! -f "$CONFIG" ]; then  # before the setup: a typo costs no time
  configs="$(grep -l 'python -m experiments.train ' configs/*.py | paste -sd, - | sed 's/,/, /g')"
  echo "error: CONFIG=$CONFIG does not exist: use one of $configs" >&2
  exit 2
fi
WORKDIR="${WORKDIR:-runs/$(basename "$CONFIG" .py)}"
for arg in "$@"; do  # a --workdir flag wins, as in experiments.train
  case "$arg" in --workdir=*) WORKDIR="${arg#--workdir=}" ;; esac
done
bash scripts/setup.sh
VENV="${QSPARSE_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
# Fashion-MNIST is the main data set; preparing it again is a no-op (about 2 s).
PYTHON="$VENV/bin/python" bash scripts/prepare_data.sh
"$VENV/bin/python" -m experiments.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
echo "results: $WORKDIR/results.json; per-epoch metrics (TensorBoard event files):" \
  "$WORKDIR/events.out.tfevents.*"
