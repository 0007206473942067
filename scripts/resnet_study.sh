#!/usr/bin/env bash
# configs/resnet.py on Fashion-MNIST, the same epochs each, every covered layer (first and last
# included): FP32 dense, 4-bit weights and activations with 2X blocks, and 2-bit weights and
# activations with 4X blocks, first with LSQ's clipped weight gradient, then with the gradient
# passed outside the quantizer's range (quant.weight_grad=identity), then also with four 2-bit
# weight levels instead of three (quant.zero_level=False: the mid-rise set); then one lever at a
# time on those; the best recipe and FP32 over seeds 0-2; the best recipe with the batch
# statistics re-estimated after each epoch (recalibrate_batches), and that with weight decay 0.6
# (seeds 0-2) and 1.0 (seed 2). Writes
# experiments/results/resnet/*.json and table.md (the README shows its first rows). Each run
# resumes where it stopped.
#
#   bash scripts/resnet_study.sh [EPOCHS]    # default 12 (the config's): 15-25 minutes a run
#                                            # on 2 CPU cores, 26 runs
#   bash scripts/resnet_study.sh table       # only table.md, from the committed results
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TABLE_ONLY=0
[ "${1:-}" = table ] && TABLE_ONLY=1 && shift
EPOCHS="${1:-12}"
case "$EPOCHS" in
  '' | *[!0-9]* | 0 | 1)
    echo "EPOCHS='$EPOCHS' is not allowed: use a whole number >= 2, or 'table'" >&2
    exit 2 ;;
esac
bash scripts/setup.sh
PY="${QSPARSE_VENV:-$ROOT/.venv}/bin/python"
[ "$TABLE_ONLY" = 1 ] || PYTHON="$PY" bash scripts/prepare_data.sh >/dev/null
RUNS="${QSPARSE_RUNS:-runs/resnet_study}"
OUT=experiments/results/resnet
mkdir -p "$RUNS" "$OUT"
# The config's pruning schedule scaled to E epochs: dense for the first sixth, blocks removed
# until two thirds, then fine-tuned (12 epochs: 2 and 8, as in configs/resnet.py).
schedule() {  # E [END]
  local begin=$((($1 + 3) / 6)) end=${2:-}
  [ -n "$end" ] || end=$(($1 * 2 / 3))
  [ "$end" -gt "$begin" ] || end=$((begin + 1))
  echo --config.num_epochs="$1" --config.sparsity.prune_begin_epoch="$begin" \
    --config.sparsity.prune_end_epoch="$end"
}

run() {  # name epochs [overrides...]; END=N: pruning ends at epoch N
  local name=$1 epochs=$2
  shift 2
  echo "== $name"
  # shellcheck disable=SC2046  # the schedule's flags are words
  "$PY" -m experiments.train --config=configs/resnet.py --workdir="$RUNS/$name" \
    $(schedule "$epochs" "${END:-}") "$@" | tail -n 1
  "$PY" - "$RUNS/$name/results.json" "$OUT/$name.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
keep = ("epoch", "test_accuracy", "test_accuracy_moving_averages", "train_loss")
r["history"] = [{k: h[k] for k in keep if k in h} for h in r["history"]]
json.dump(r, open(sys.argv[2], "w"), indent=1)
PYEOF
}

FP32=(--config.quant.w_bits=32 --config.quant.a_bits=32 --config.sparsity.compression=1
  --config.sparsity.block_shape='()' --config.sparsity.first_block_shape='()'
  --config.sparsity.last_block_shape='()')
W2A2=(--config.quant.w_bits=2 --config.quant.a_bits=2 --config.sparsity.compression=4)
STE=("${W2A2[@]}" --config.quant.weight_grad=identity)
# The study's 2/2/4X recipe: the identity gradient and four 2-bit levels.
MIDRISE=("${STE[@]}" --config.quant.zero_level=False)
HALF=$((EPOCHS / 2))
if [ "$TABLE_ONLY" = 0 ]; then
run fp32 "$EPOCHS" "${FP32[@]}"
run w4a4_2x "$EPOCHS"
run w2a2_4x "$EPOCHS" "${W2A2[@]}"
run w2a2_4x_ste "$EPOCHS" "${STE[@]}"
run w2a2_4x_ste_midrise "$EPOCHS" "${MIDRISE[@]}"
# Levers, one at a time.
run w2a2_4x_ste_midrise_columns "$EPOCHS" "${MIDRISE[@]}" --config.sparsity.balanced=columns
run w2a2_4x_ste_midrise_wd "$EPOCHS" "${MIDRISE[@]}" --config.weight_decay=0.1
run w2a2_4x_ste_midrise_columns_wd "$EPOCHS" "${MIDRISE[@]}" --config.sparsity.balanced=columns \
  --config.weight_decay=0.1
COLUMNS=("${MIDRISE[@]}" --config.sparsity.balanced=columns)
BEST=("${COLUMNS[@]}" --config.weight_decay=0.3)
run w2a2_4x_ste_midrise_columns_wd03 "$EPOCHS" "${BEST[@]}"
END=$HALF run w2a2_4x_ste_midrise_ft6 "$EPOCHS" "${MIDRISE[@]}"
run fp32_half "$HALF" "${FP32[@]}"
run w2a2_4x_ste_distill "$EPOCHS" "${STE[@]}" --config.distill.weight=0.7 \
  --config.distill.temperature=4 --config.distill.teacher_workdir="$RUNS/fp32_half"
run w2a2_4x_after_fp32 "$HALF" "${W2A2[@]}" --config.init_from="$RUNS/fp32_half"
run w2a2_4x_ste_after_fp32 "$HALF" "${STE[@]}" --config.init_from="$RUNS/fp32_half"
for seed in 1 2; do  # FP32 and the best 2/2/4X recipe over two more seeds
  run "fp32_seed$seed" "$EPOCHS" "${FP32[@]}" --config.seed=$seed
  run "w2a2_4x_ste_midrise_columns_wd03_seed$seed" "$EPOCHS" "${BEST[@]}" --config.seed=$seed
done
# The best recipe with the batch statistics re-estimated after each epoch (the same training;
# the evaluation at the epoch's weights), seeds 0-2, and FP32 so evaluated at seed 0.
RECAL=(--config.recalibrate_batches=50)
run fp32_recal "$EPOCHS" "${FP32[@]}" "${RECAL[@]}"
for seed in 0 1 2; do
  sfx=$([ "$seed" = 0 ] || echo "_seed$seed")
  run "w2a2_4x_recal$sfx" "$EPOCHS" "${BEST[@]}" "${RECAL[@]}" --config.seed=$seed
done
# Weight decay 0.6 and 1.0 on that recipe at seed 2 (its worst), then 0.6 over seeds 0-2.
run w2a2_4x_recal_wd10_seed2 "$EPOCHS" "${COLUMNS[@]}" "${RECAL[@]}" --config.weight_decay=1.0 \
  --config.seed=2
for seed in 2 0 1; do
  sfx=$([ "$seed" = 0 ] || echo "_seed$seed")
  run "w2a2_4x_recal_wd06$sfx" "$EPOCHS" "${COLUMNS[@]}" "${RECAL[@]}" \
    --config.weight_decay=0.6 --config.seed=$seed
done
fi

"$PY" - "$OUT" "$EPOCHS" <<'PYEOF' | tee "$OUT/table.md"
import json, pathlib, sys
out, epochs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
half = epochs // 2
rows = (
    ("fp32", "FP32 dense"),
    ("w4a4_2x", "4-bit W / 4-bit A / 2X blocks"),
    ("w2a2_4x", "2-bit W / 2-bit A / 4X blocks (LSQ's clipped weight gradient)"),
    ("w2a2_4x_ste", "2/2/4X, weight gradient passed outside the range (`quant.weight_grad=identity`)"),
    ("w2a2_4x_ste_midrise", "the same, four 2-bit weight levels (`quant.zero_level=False`)"),
    ("w2a2_4x_ste_midrise_columns", "lever on the row above: column-balanced blocks (`sparsity.balanced=columns`)"),
    ("w2a2_4x_ste_midrise_wd", "lever: weight decay 0.1"),
    ("w2a2_4x_ste_midrise_columns_wd", "lever: column-balanced blocks, weight decay 0.1"),
    ("w2a2_4x_ste_midrise_columns_wd03", "lever: column-balanced blocks, weight decay 0.3"),
    ("w2a2_4x_recal", "the same, batch statistics re-estimated after each epoch "
     "(`recalibrate_batches=50`)"),
    ("w2a2_4x_recal_wd06", "the same, weight decay 0.6"),
    ("fp32_recal", "FP32 dense, batch statistics re-estimated after each epoch"),
    ("w2a2_4x_ste_midrise_ft6", f"lever: pruning ends at epoch {half}, not {epochs * 2 // 3}"),
    ("w2a2_4x_ste_distill", f"2/2/4X, identity gradient, distilled from FP32 (weight 0.7, T=4; "
     f"teacher {half} FP32 epochs)"),
    ("w2a2_4x_after_fp32", f"2/2/4X (clipped gradient) after {half} FP32 epochs, {half} epochs"),
    ("w2a2_4x_ste_after_fp32", f"the same, identity gradient"),
)
runs = {n: json.loads((out / f"{n}.json").read_text()) for n, _ in rows}
fp = runs["fp32"]["test_accuracy"]
print(f"ResNet-8 on Fashion-MNIST, {epochs} epochs, seed 0: `bash scripts/resnet_study.sh {epochs}`\n")
print("| run | test accuracy | vs FP32 | weight memory | compression |")
print("|---|---|---|---|---|")
for name, label in rows:
    r = runs[name]
    print(f"| {label} | {100 * r['test_accuracy']:.2f}% | {100 * (r['test_accuracy'] - fp):+.2f}"
          f" points | {r['weight_memory_bits'] / 8192:.1f} KiB | {r['weight_compression']:.1f}X |")


# Seeds found and statistics as the claims table computes them.
from experiments.report import _by_seed, _stats

fps = _by_seed(out, "fp32")
recipes = (
    ("2/2/4X, column-balanced blocks, weight decay 0.3", _by_seed(out, "w2a2_4x_ste_midrise_columns_wd03")),
    ("the same, batch statistics re-estimated", _by_seed(out, "w2a2_4x_recal")),
    ("the same, weight decay 0.6", _by_seed(out, "w2a2_4x_recal_wd06")),
)
both = sorted(set(fps).intersection(*(rs for _, rs in recipes)))


def row(label, values, fmt):
    print(f"| {label} | " + " | ".join(fmt % v for v in values) + f" | {fmt} ± %.2f |"
          % _stats(values)[:2])


print(f"\nOver seeds {', '.join(map(str, both))} (gaps paired by seed):\n")
print("| run | " + " | ".join(f"seed {s}" for s in both) + " | mean ± std |")
print("|---|" + "---|" * (len(both) + 1))
row("FP32 dense", [100 * fps[s]["test_accuracy"] for s in both], "%.2f%%")
for label, rs in recipes:
    gaps = [100 * (fps[s]["test_accuracy"] - rs[s]["test_accuracy"]) for s in both]
    row(label, [100 * rs[s]["test_accuracy"] for s in both], "%.2f%%")
    row("gap (points below FP32)", gaps, "%.2f")
# Runs that recorded both evaluations of their final weights: the gain of re-estimation alone.
both_ways = [
    f"{f.stem} {100 * r['test_accuracy_moving_averages']:.2f}% -> {100 * r['test_accuracy']:.2f}%"
    for f in sorted(out.glob("*.json"))
    if "test_accuracy_moving_averages" in (r := json.loads(f.read_text()))
]
if both_ways:
    print("\nThe same final weights with the moving averages -> re-estimated: "
          + "; ".join(both_ways) + ".")
decays = [(wd, out / f"w2a2_4x_recal{sfx}_seed2.json") for wd, sfx in ((0.3, ""), (0.6, "_wd06"),
                                                                         (1.0, "_wd10"))]
print("\nWeight decay on the re-estimated recipe, seed 2: " + ", ".join(
    f"{wd} {100 * json.loads(f.read_text())['test_accuracy']:.2f}%" for wd, f in decays
    if f.exists()) + ".")
w4 = 100 * (fp - runs["w4a4_2x"]["test_accuracy"])
g, sd, se = _stats(gaps)  # the last recipe's
print(f"\nTargets: 4/4/2X within 1.5 points of FP32: {w4:.2f} (seed 0), "
      f"{'met' if w4 <= 1.5 else 'missed'}; 2/2/4X within 4 points: {g:.2f} ± {sd:.2f} "
      f"(mean ± std over {len(gaps)} seeds, standard error {se:.2f}), "
      f"{'met' if g <= 4 else 'missed'}.")
PYEOF
