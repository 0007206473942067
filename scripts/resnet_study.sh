#!/usr/bin/env bash
# configs/resnet.py on Fashion-MNIST, the same epochs each: FP32 dense, 4-bit weights and
# activations with 2X blocks, 2-bit weights and activations with 4X blocks, every covered layer
# (first and last included), and 2/2/4X again with the first half of the epochs spent in FP32
# (FP32 for EPOCHS/2, then 2/2/4X for EPOCHS/2 started from it: init_from), and 2/2/4X with
# the weight gradient passed outside the quantizer's range (quant.weight_grad=identity), from
# scratch and from the FP32 half. Writes
# experiments/results/resnet/*.json and prints the table the README shows. Each run resumes
# where it stopped.
#
#   bash scripts/resnet_study.sh [EPOCHS]    # default 12 (the config's): about 21 minutes a run on 2 CPU cores
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EPOCHS="${1:-12}"
bash scripts/setup.sh
PY="${QSPARSE_VENV:-$ROOT/.venv}/bin/python"
PYTHON="$PY" bash scripts/prepare_data.sh >/dev/null
RUNS="${QSPARSE_RUNS:-runs/resnet_study}"
OUT=experiments/results/resnet
mkdir -p "$RUNS" "$OUT"
# The config's pruning schedule scaled to E epochs: dense for the first sixth, blocks removed
# until two thirds, then fine-tuned (12 epochs: 2 and 8, as in configs/resnet.py).
schedule() {  # E
  local begin=$((($1 + 3) / 6)) end=$(($1 * 2 / 3))
  [ "$end" -gt "$begin" ] || end=$((begin + 1))
  echo --config.num_epochs="$1" --config.sparsity.prune_begin_epoch="$begin" \
    --config.sparsity.prune_end_epoch="$end"
}

run() {  # name epochs [overrides...]
  local name=$1 epochs=$2
  shift 2
  echo "== $name"
  # shellcheck disable=SC2046  # the schedule's flags are words
  "$PY" -m experiments.train --config=configs/resnet.py --workdir="$RUNS/$name" \
    $(schedule "$epochs") "$@" | tail -n 1
  "$PY" - "$RUNS/$name/results.json" "$OUT/$name.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
r["history"] = [{k: h[k] for k in ("epoch", "test_accuracy", "train_loss")} for h in r["history"]]
json.dump(r, open(sys.argv[2], "w"), indent=1)
PYEOF
}

FP32=(--config.quant.w_bits=32 --config.quant.a_bits=32 --config.sparsity.compression=1
  --config.sparsity.block_shape='()' --config.sparsity.first_block_shape='()'
  --config.sparsity.last_block_shape='()')
W2A2=(--config.quant.w_bits=2 --config.quant.a_bits=2 --config.sparsity.compression=4)
HALF=$((EPOCHS / 2))
run fp32 "$EPOCHS" "${FP32[@]}"
run w4a4_2x "$EPOCHS"
run w2a2_4x "$EPOCHS" "${W2A2[@]}"
run fp32_half "$HALF" "${FP32[@]}"
run w2a2_4x_after_fp32 "$HALF" "${W2A2[@]}" --config.init_from="$RUNS/fp32_half"
run w2a2_4x_ste "$EPOCHS" "${W2A2[@]}" --config.quant.weight_grad=identity
run w2a2_4x_ste_after_fp32 "$HALF" "${W2A2[@]}" --config.quant.weight_grad=identity \
  --config.init_from="$RUNS/fp32_half"

"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
names = ("fp32", "w4a4_2x", "w2a2_4x", "w2a2_4x_after_fp32", "w2a2_4x_ste",
         "w2a2_4x_ste_after_fp32")
rows = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
fp = rows["fp32"]["test_accuracy"]
print("| ResNet-8, Fashion-MNIST | test accuracy | vs FP32 | weight memory | compression |")
print("|---|---|---|---|---|")
for name, label in (("fp32", "FP32 dense"), ("w4a4_2x", "4-bit W / 4-bit A / 2X blocks"),
                    ("w2a2_4x", "2-bit W / 2-bit A / 4X blocks"),
                    ("w2a2_4x_after_fp32", "the same, first half of the epochs in FP32"),
                    ("w2a2_4x_ste", "2/2/4X, weight gradient passed outside the range"
                     " (`quant.weight_grad=identity`)"),
                    ("w2a2_4x_ste_after_fp32", "the same, first half of the epochs in FP32")):
    r = rows[name]
    print(f"| {label} | {100 * r['test_accuracy']:.2f}% | {100 * (r['test_accuracy'] - fp):+.2f}"
          f" points | {r['weight_memory_bits'] / 8192:.1f} KiB | {r['weight_compression']:.1f}X |")
PYEOF
