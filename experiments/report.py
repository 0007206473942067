r"""Turns experiments/results/ (written by scripts/reproduce.sh) into the Results table.

  python -m experiments.report --results=experiments/results --readme=README.md

Writes RESULTS/summary.md and RESULTS/study.png, and replaces the README's section between
``<!-- results:start -->`` and ``<!-- results:end -->`` with the same table, so every number
there comes from the files this script reads.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for r in csv.DictReader(path.open()):
        out = {}
        for k, v in r.items():
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                out[k] = v
        rows.append(out)
    return rows


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def pct(x: float) -> str:
    """Accuracy as a percentage with two decimals."""
    return f"{100 * x:.2f}%"


def _best_within(rows, base_acc, points=1.0, key="weight_memory_bits"):
    """The row of least ``key`` whose accuracy is within ``points`` of ``base_acc``."""
    ok = [r for r in rows if r["test_accuracy"] >= base_acc - points / 100]
    return min(ok, key=lambda r: (r[key], -r["test_accuracy"])) if ok else None


def _seed_gaps(anchors: Path) -> list[tuple[int, float, float]]:
    """``(seed, FP32 accuracy, gap in points)`` for every seed with both anchors.

    Seed 0 is ``dense_fp32.json`` / ``joint.json``; seed ``s`` is ``*_seed{s}.json``.
    """
    out = []
    for f in sorted(anchors.glob("dense_fp32*.json")):
        m = re.fullmatch(r"dense_fp32(?:_seed(\d+))?", f.stem)
        if not m:
            continue
        suffix = f"_seed{m.group(1)}" if m.group(1) else ""
        dense, joint = _json(f), _json(anchors / f"joint{suffix}.json")
        if dense and joint:
            gap = 100 * (dense["test_accuracy"] - joint["test_accuracy"])
            out.append((int(m.group(1) or 0), dense["test_accuracy"], gap))
    return sorted(out)


def build(results: Path) -> tuple[str, dict]:
    """Builds the Markdown results section from the result files.

    Args:
      results: the experiments/results directory.

    Returns:
      ``(markdown, numbers)``.
    """
    a = {
        n: _json(results / "anchors" / f"{n}.json")
        for n in ("dense_fp32", "quant_only", "sparse_only", "joint")
    }
    levers = {p.stem: _json(p) for p in sorted((results / "levers").glob("*.json"))}
    grid = _csv(results / "grid" / "results.csv")
    gpareto = _csv(results / "grid" / "pareto.csv")
    shapes = _csv(results / "shapes" / "results.csv")
    lines, nums = [], {}
    lines.append("| claim (seed) | our measurement | agrees? |")
    lines.append("|---|---|---|")

    base = a["dense_fp32"]
    if base:
        nums["fp32"] = base["test_accuracy"]
        lines.append(
            f"| FP32 dense baseline, MLP 784-512-512-10 | {pct(base['test_accuracy'])} test "
            f"accuracy, {base['weight_memory_bits'] / 8 / 1024:.0f} KiB of weights | — |"
        )
    gbase = next(
        (r for r in grid if r["w_bits"] == 32 and r["a_bits"] == 32 and r["compression"] == 1), None
    )
    if grid and gbase:
        q = _best_within(
            [r for r in grid if r["compression"] == 1 and r["w_bits"] < 32], gbase["test_accuracy"]
        )
        if q:
            red = gbase["weight_memory_bits"] / q["weight_memory_bits"]
            nums["quant_only_reduction"] = red
            lines.append(
                f"| quantization only: about 16X | lowest weight memory within 1 point of the "
                f"grid's FP32 ({pct(gbase['test_accuracy'])}): w{q['w_bits']:g}/a{q['a_bits']:g}, "
                f"{pct(q['test_accuracy'])}, **{red:.1f}X** | "
                f"{'more than the seed' if red > 20 else ('yes' if red >= 12 else 'no')} |"
            )
        s = [r for r in grid if r["w_bits"] == 32 and r["a_bits"] == 32]
        ok = [r for r in s if r["test_accuracy"] >= gbase["test_accuracy"] - 0.01]
        if ok:
            best = max(ok, key=lambda r: r["compression"])
            red = gbase["weight_memory_bits"] / best["weight_memory_bits"]
            nums["sparse_only_reduction"] = red
            lines.append(
                f"| sparsity only: about 2X | highest block compression within 1 point: "
                f"{best['compression']:g}X blocks, {pct(best['test_accuracy'])}, **{red:.1f}X** "
                f"weight memory (index counted) | "
                f"{'yes' if 1.5 <= red <= 3 else ('more than the seed' if red > 3 else 'no')} |"
            )
    j = a["joint"]
    if j and base:
        gap = 100 * (base["test_accuracy"] - j["test_accuracy"])
        nums["joint_gap"] = gap
        nums["joint_compression"] = j["weight_compression"]
        lines.append(
            f"| joint 2-bit W / 2-bit A / 4X blocks, every layer: about 50X, accuracy close to FP32"
            f" | {pct(j['test_accuracy'])} ({gap:.2f} points below FP32), "
            f"**{j['weight_compression']:.1f}X** weight memory (index and scales counted) | "
            f"{'yes' if j['weight_compression'] >= 50 and gap <= 1.5 else 'no'} |"
        )
    seeds = _seed_gaps(results / "anchors")
    if len(seeds) > 1:
        gaps = [g for _, _, g in seeds]
        nums["joint_gaps"] = gaps
        desc = ", ".join(f"seed {s}: {pct(f)} vs {pct(f - g / 100)}" for s, f, g in seeds)
        lines.append(
            f"| the same over {len(seeds)} seeds (initialization and data order) | FP32 vs joint"
            f" {desc}; gap {min(gaps):.2f} to {max(gaps):.2f} points, mean "
            f"{sum(gaps) / len(gaps):.2f} | {'yes' if max(gaps) <= 1.5 else 'partly'} |"
        )
    for name, label in (
        ("quant_only", "quantization only 2/2 dense"),
        ("sparse_only", "sparsity only FP32 4X"),
    ):
        r = a[name]
        if r and base:
            lines.append(
                f"| {label}, MLP 784-512-512-10 | {pct(r['test_accuracy'])}, "
                f"{r['weight_compression']:.1f}X | — |"
            )
    if grid and gbase:
        joint = [r for r in grid if r["w_bits"] < 32 and r["compression"] > 1]
        ok = [r for r in joint if r["test_accuracy"] >= gbase["test_accuracy"] - 0.01]
        if ok:
            best = max(ok, key=lambda r: r["weight_compression"])
            nums["best_joint"] = best
            lines.append(
                f"| best joint setting (seed: 2/2/4X) | highest compression within 1 point on the "
                f"grid: w{best['w_bits']:g}/a{best['a_bits']:g}/{best['compression']:g}X, "
                f"{pct(best['test_accuracy'])}, {best['weight_compression']:.1f}X | "
                f"{'yes' if (best['w_bits'], best['compression']) == (2, 4) else 'differs'} |"
            )
    for bits in ((2, 2), (32, 32)):
        by = {}
        for r in shapes:
            if (r["w_bits"], r["a_bits"]) == bits:
                by[str(r["model"])] = r
        if by:
            desc = ", ".join(
                f"{m} {pct(r['test_accuracy'])} at {r['weight_memory_bits'] / 8 / 1024:.1f} KiB"
                for m, r in sorted(by.items(), key=lambda kv: -kv[1]["test_accuracy"])
            )
            win = max(by, key=lambda m: by[m]["test_accuracy"])
            lines.append(
                f"| deep-sparse beats shallow-dense at the same memory | w{bits[0]}/a{bits[1]}, "
                f"matched kept "
                f"weights: {desc} | {'yes' if win.startswith('deep') else 'no: ' + win + ' wins'} |"
            )
    if gpareto:
        tot = [r for r in gpareto if r["frontier"] == "total"]
        wt = [r for r in gpareto if r["frontier"] == "weight"]
        hi_t = sum(r["compression"] >= 8 for r in tot)
        hi_w = sum(r["compression"] >= 8 for r in wt)
        nums["pareto"] = (len(wt), len(tot))
        lines.append(
            f"| Pareto-optimal set: 11 designs; activation memory matters at high sparsity | "
            f"{len(grid)} designs → {len(wt)} Pareto-optimal on weight memory, {len(tot)} on "
            f"weights + activations; designs with >= 8X blocks: {hi_w} → {hi_t} | "
            f"{'yes' if hi_t < hi_w else 'partly'} |"
        )
    if levers and j:
        lines.append("")
        spread = ""
        if len(seeds) > 1:
            accs = [f - g / 100 for _, f, g in seeds]
            spread = (
                f" for scale, the joint recipe itself spans {100 * (max(accs) - min(accs)):.2f}"
                f" points over {len(seeds)} seeds"
            )
        lines.append(
            f"Levers on the joint 2/2/4X setting (one change each, seed 0){';' if spread else ''}"
            f"{spread}:"
        )
        lines.append("")
        lines.append("| lever | test accuracy | change vs joint |")
        lines.append("|---|---|---|")
        lines.append(
            f"| joint recipe (LSQ steps, PACT clips, prox, 30 epochs, bfloat16 backward) | "
            f"{pct(j['test_accuracy'])} | — |"
        )
        names = {
            "max_scale": "max-abs step instead of learned (LSQ)",
            "fixed_clip": "fixed activation clip instead of learned (PACT)",
            "no_prox": "no proximal block lasso before pruning",
            "balanced": "balanced blocks (equal per block row)",
            "long_ft": "45 epochs (31 of fine-tuning) instead of 30",
            "distill": "distillation from the FP32 anchor (weight 0.7, T=4)",
            "f32_grads": "float32 backward matmuls instead of bfloat16 (quant.bf16_grads)",
        }
        for k, r in levers.items():
            d = 100 * (r["test_accuracy"] - j["test_accuracy"])
            lines.append(f"| {names.get(k, k)} | {pct(r['test_accuracy'])} | {d:+.2f} points |")
    return "\n".join(lines) + "\n", nums


def plot_anchors(results: Path, out: Path) -> None:
    """Accuracy against weight memory for the anchors and the grid, one picture."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    grid = _csv(results / "grid" / "results.csv")
    if grid:
        ax.scatter(
            [r["weight_memory_bits"] / 8192 for r in grid],
            [100 * r["test_accuracy"] for r in grid],
            s=12,
            c="0.7",
            label="grid 784-256-256-10, 8 epochs",
        )
    for name, mark in (
        ("dense_fp32", "o"),
        ("quant_only", "s"),
        ("sparse_only", "^"),
        ("joint", "*"),
    ):
        r = _json(results / "anchors" / f"{name}.json")
        if r:
            ax.scatter(
                [r["weight_memory_bits"] / 8192],
                [100 * r["test_accuracy"]],
                s=80,
                marker=mark,
                label=f"{name} 784-512-512-10, 30 epochs",
            )
    ax.set_xscale("log")
    ax.set_xlabel("weight memory (KiB, codes + index + scales + biases)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], 70))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="experiments/results")
    p.add_argument("--readme", default="")
    args = p.parse_args(argv)
    results = Path(args.results)
    table, _ = build(results)
    plot_anchors(results, results / "study.png")
    (results / "summary.md").write_text("# Reproduction summary\n\n" + table)
    print(table)
    if args.readme:
        readme = Path(args.readme)
        text = readme.read_text()
        if START in text and END in text:
            new = re.sub(
                re.escape(START) + ".*?" + re.escape(END),
                lambda _: f"{START}\n{table}{END}",
                text,
                flags=re.S,
            )
            readme.write_text(new)


if __name__ == "__main__":
    main()
