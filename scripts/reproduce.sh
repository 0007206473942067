#!/usr/bin/env bash
# Reproduces the study of shared/seed/thesis-abstract.txt on Fashion-MNIST (offline, Debian
# package), 75 minutes on 2 CPU cores (the parts' estimates below), and writes small
# files (CSV, JSON, PNG, Markdown) to experiments/results/, then the README's Results table
# (experiments/report.py). Each part resumes where it stopped.
#
#   bash scripts/reproduce.sh                 # every part of the study
#   bash scripts/reproduce.sh anchors grid    # some parts: anchors levers grid shapes cnn
#                                             # cnn_shapes report, and more_levers (not in
#                                             # the default run)
#
# Parts:
#   anchors  experiments.train: FP32 dense and joint 2/2/4X on every layer; MLP
#            784-512-512-10, 30 epochs, seeds 0, 1, 2 (~6 min; quantization-only and
#            sparsity-only come from the grid)
#   levers   experiments.train: the joint setting started from the FP32 anchor's weights, and
#            with int8 biases (the study's 60X target), seeds 0-2 (~8 min)
#   grid     experiments.sweep configs/repro_grid.py: 60 designs w x a x compression, seeds
#            0-2 (~22 min)
#   shapes   experiments.sweep configs/repro_shapes.py: shallow-dense vs wide- vs deep-sparse
#            at matched kept weights, w2/a2 and w32/a32, seeds 0-2 (~6 min)
#   cnn      experiments.sweep configs/repro_cnn_grid.py: a LeNet-style CNN, FP32 / quantization
#            only / sparsity only / joint at 2 bits and 4X, seeds 0-2 (~20 min)
#   cnn_shapes  experiments.sweep configs/repro_cnn_shapes.py: shallow-dense vs wide- vs
#            deep-sparse CNNs at matched kept weights, w2/a2, seeds 0-2 (~12 min)
#   report   experiments/report.py: results table, plots, README section
#   more_levers  the joint setting with one more lever changed each, seed 0 unless said: max-abs
#            instead of learned (LSQ) steps, fixed instead of learned (PACT) clips, no proximal
#            block lasso, balanced blocks, 45 instead of 30 epochs, distillation from the FP32
#            anchor, float32 instead of bfloat16 backward matmuls, the weight gradient passed
#            outside the quantizer's range (seeds 0-2) (~14 min; needs anchors; the report's
#            levers table reads whatever lever results are there)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(anchors levers grid shapes cnn cnn_shapes report)
for part in "${PARTS[@]}"; do  # every name checked before hours of training start
  case "$part" in
    anchors | levers | more_levers | grid | shapes | cnn | cnn_shapes | report) ;;
    *)
      echo "unknown part '$part': use anchors levers grid shapes cnn cnn_shapes report" \
        "more_levers" >&2
      exit 2
      ;;
  esac
done
bash scripts/setup.sh
VENV="${QSPARSE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
PYTHON="$PY" bash scripts/prepare_data.sh >/dev/null
RUNS="${QSPARSE_RUNS:-runs/repro}"
OUT=experiments/results
mkdir -p "$RUNS" "$OUT/anchors" "$OUT/levers"

train() {  # name config [overrides...]: train (or resume), keep results.json without history
  local name=$1 cfg=$2 dest=$3
  shift 3
  echo "== $name"
  "$PY" -m experiments.train --config="$cfg" --workdir="$RUNS/$name" "$@" | tail -n 1
  "$PY" - "$RUNS/$name/results.json" "$dest/$name.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
r["history"] = [{k: h[k] for k in ("epoch", "test_accuracy", "train_loss")} for h in r["history"]]
json.dump(r, open(sys.argv[2], "w"), indent=1)
PYEOF
}

sweep() {  # name config
  local name=$1 cfg=$2
  echo "== $name"
  "$PY" -m experiments.sweep --config="$cfg" --workdir="$RUNS/$name"
  mkdir -p "$OUT/$name"
  cp "$RUNS/$name"/{results.csv,means.csv,pareto.csv,pareto.png,pareto_weight.png,summary.md} \
    "$OUT/$name/"
}

for part in "${PARTS[@]}"; do
  case "$part" in
    anchors)
      train dense_fp32 configs/dense_fp32.py "$OUT/anchors"
      train joint configs/joint.py "$OUT/anchors"
      for seed in 1 2; do  # the gap over initializations and data orders, not one draw
        train "dense_fp32_seed$seed" configs/dense_fp32.py "$OUT/anchors" --config.seed=$seed
        train "joint_seed$seed" configs/joint.py "$OUT/anchors" --config.seed=$seed
      done
      ;;
    levers)
      mkdir -p "$OUT/levers/seeds"
      train init_fp32 configs/joint.py "$OUT/levers" --config.init_from="$RUNS/dense_fp32"
      train bias8 configs/joint.py "$OUT/levers" --config.quant.bias_bits=8
      for seed in 1 2; do  # over the anchors' seeds
        train "init_fp32_seed$seed" configs/joint.py "$OUT/levers/seeds" --config.seed=$seed \
          --config.init_from="$RUNS/dense_fp32_seed$seed"
        train "bias8_seed$seed" configs/joint.py "$OUT/levers/seeds" --config.seed=$seed \
          --config.quant.bias_bits=8
      done
      ;;
    more_levers)
      mkdir -p "$OUT/levers/seeds"
      train max_scale configs/joint.py "$OUT/levers" --config.quant.scale_mode=max
      train fixed_clip configs/joint.py "$OUT/levers" --config.quant.learn_clip=False
      train no_prox configs/joint.py "$OUT/levers" --config.sparsity.prox_strength=0.0
      train balanced configs/joint.py "$OUT/levers" --config.sparsity.balanced=rows
      train long_ft configs/joint.py "$OUT/levers" --config.num_epochs=45
      train distill configs/joint.py "$OUT/levers" --config.distill.weight=0.7 \
        --config.distill.teacher_workdir="$RUNS/dense_fp32"
      train f32_grads configs/joint.py "$OUT/levers" --config.quant.bf16_grads=False
      train ste configs/joint.py "$OUT/levers" --config.quant.weight_grad=identity
      for seed in 1 2; do
        train "ste_seed$seed" configs/joint.py "$OUT/levers/seeds" --config.seed=$seed \
          --config.quant.weight_grad=identity
      done
      ;;
    grid) sweep grid configs/repro_grid.py ;;
    shapes) sweep shapes configs/repro_shapes.py ;;
    cnn) sweep cnn_grid configs/repro_cnn_grid.py ;;
    cnn_shapes) sweep cnn_shapes configs/repro_cnn_shapes.py ;;
    report) "$PY" -m experiments.report --results="$OUT" --readme=README.md ;;
  esac
  echo "-- $part done at $((SECONDS / 60)) min $((SECONDS % 60)) s"
done
