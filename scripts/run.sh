#!/usr/bin/env bash
# THE main job: sets up what is missing (virtual environment, package, Fashion-MNIST from the
# Debian package where the system allows), then trains configs/default.py (joint 2-bit weights,
# 2-bit activations, 4X blocks) and prints accuracy, memory and compression.
# Usage: bash scripts/run.sh [CONFIG] [WORKDIR] [--config.FIELD=VALUE ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG="${1:-configs/default.py}"
WORKDIR="${2:-runs/$(basename "$CONFIG" .py)}"
shift $(( $# > 2 ? 2 : $# ))
bash scripts/setup.sh
VENV="${QSPARSE_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
# Fashion-MNIST is the main data set; preparing it again is a no-op (about 2 s).
PYTHON="$VENV/bin/python" bash scripts/prepare_data.sh
"$VENV/bin/python" -m experiments.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
echo "results: $WORKDIR/results.json   TensorBoard: tensorboard --logdir $WORKDIR"
