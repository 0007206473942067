#!/usr/bin/env bash
# configs/resnet.py on Fashion-MNIST three ways, the same epochs: FP32 dense, 4-bit weights and
# activations with 2X blocks, and 2-bit weights and activations with 4X blocks, every covered
# layer (first and last included). Writes experiments/results/resnet/{fp32,w4a4_2x,w2a2_4x}.json
# and prints the table the README shows. Each run resumes where it stopped.
#
#   bash scripts/resnet_study.sh [EPOCHS]    # default 12 (the config's): about 35 minutes a run on 2 CPU cores
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
# The config's pruning schedule scaled to EPOCHS: dense for the first sixth, blocks removed
# until two thirds, then fine-tuned (12 epochs: 2 and 8, as in configs/resnet.py).
BEGIN=$(((EPOCHS + 3) / 6))
END=$((EPOCHS * 2 / 3 > BEGIN ? EPOCHS * 2 / 3 : BEGIN + 1))
schedule=(--config.num_epochs="$EPOCHS" --config.sparsity.prune_begin_epoch="$BEGIN"
  --config.sparsity.prune_end_epoch="$END")

run() {  # name [overrides...]
  local name=$1
  shift
  echo "== $name"
  "$PY" -m experiments.train --config=configs/resnet.py --workdir="$RUNS/$name" \
    "${schedule[@]}" "$@" | tail -n 1
  "$PY" - "$RUNS/$name/results.json" "$OUT/$name.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
r["history"] = [{k: h[k] for k in ("epoch", "test_accuracy", "train_loss")} for h in r["history"]]
json.dump(r, open(sys.argv[2], "w"), indent=1)
PYEOF
}

run fp32 --config.quant.w_bits=32 --config.quant.a_bits=32 --config.sparsity.compression=1 \
  --config.sparsity.block_shape='()' --config.sparsity.first_block_shape='()' \
  --config.sparsity.last_block_shape='()'
run w4a4_2x
run w2a2_4x --config.quant.w_bits=2 --config.quant.a_bits=2 --config.sparsity.compression=4

"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {n: json.loads((out / f"{n}.json").read_text()) for n in ("fp32", "w4a4_2x", "w2a2_4x")}
fp = rows["fp32"]["test_accuracy"]
print("| ResNet-8, Fashion-MNIST | test accuracy | vs FP32 | weight memory | compression |")
print("|---|---|---|---|---|")
for name, label in (("fp32", "FP32 dense"), ("w4a4_2x", "4-bit W / 4-bit A / 2X blocks"),
                    ("w2a2_4x", "2-bit W / 2-bit A / 4X blocks")):
    r = rows[name]
    print(f"| {label} | {100 * r['test_accuracy']:.2f}% | {100 * (r['test_accuracy'] - fp):+.2f}"
          f" points | {r['weight_memory_bits'] / 8192:.1f} KiB | {r['weight_compression']:.1f}X |")
PYEOF
