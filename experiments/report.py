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
import math
import re
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
# Result names before they said what they are (files written before the rename still read).
RENAMED = {"compression": "block_compression", "activation_memory_bits": "peak_activation_bits"}


def _renamed(row: dict) -> dict:
    """``row`` with the old result names replaced by the current ones (RENAMED)."""
    return {RENAMED.get(k, k) if RENAMED.get(k) not in row else k: v for k, v in row.items()}


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
        rows.append(_renamed(out))
    return rows


def _json(path: Path) -> dict | None:
    return _renamed(json.loads(path.read_text())) if path.exists() else None


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
    seeds = _seed_gaps(results / "anchors")
    gbase = next(
        (
            r
            for r in grid
            if r["w_bits"] == 32 and r["a_bits"] == 32 and r["block_compression"] == 1
        ),
        None,
    )
    nums = {}
    lines = ["| claim (seed) | our measurement | agrees? |", "|---|---|---|"]
    lines += _baseline_row(a["dense_fp32"], nums)
    if grid and gbase:
        lines += _quant_only_row(grid, gbase, nums) + _sparse_only_row(grid, gbase, nums)
    lines += _joint_rows(a, seeds, nums)
    if grid and gbase:
        lines += _best_joint_row(grid, gbase, nums)
    lines += _shape_rows(shapes)
    if gpareto:
        lines += _pareto_row(grid, gpareto, nums)
    if levers and a["joint"]:
        lines += _lever_table(levers, a["joint"], seeds)
    return "\n".join(lines) + "\n", nums


def _baseline_row(base, nums: dict) -> list[str]:
    if not base:
        return []
    nums["fp32"] = base["test_accuracy"]
    return [
        f"| FP32 dense baseline, MLP 784-512-512-10 | {pct(base['test_accuracy'])} test "
        f"accuracy, {base['weight_memory_bits'] / 8 / 1024:.0f} KiB of weights | — |"
    ]


def _quant_only_row(grid, gbase, nums: dict) -> list[str]:
    q = _best_within(
        [r for r in grid if r["block_compression"] == 1 and r["w_bits"] < 32],
        gbase["test_accuracy"],
    )
    if not q:
        return []
    red = gbase["weight_memory_bits"] / q["weight_memory_bits"]
    nums["quant_only_reduction"] = red
    return [
        f"| quantization only: about 16X | lowest weight memory within 1 point of the "
        f"grid's FP32 ({pct(gbase['test_accuracy'])}): w{q['w_bits']:g}/a{q['a_bits']:g}, "
        f"{pct(q['test_accuracy'])}, **{red:.1f}X** | "
        f"{'more than the seed' if red > 20 else ('yes' if red >= 12 else 'no')} |"
    ]


def _sparse_only_row(grid, gbase, nums: dict) -> list[str]:
    s = [r for r in grid if r["w_bits"] == 32 and r["a_bits"] == 32]
    ok = [r for r in s if r["test_accuracy"] >= gbase["test_accuracy"] - 0.01]
    if not ok:
        return []
    best = max(ok, key=lambda r: r["block_compression"])
    red = gbase["weight_memory_bits"] / best["weight_memory_bits"]
    nums["sparse_only_reduction"] = red
    return [
        f"| sparsity only: about 2X | highest block compression within 1 point: "
        f"{best['block_compression']:g}X blocks, {pct(best['test_accuracy'])}, "
        f"**{red:.1f}X** "
        f"weight memory (index counted) | "
        f"{'yes' if 1.5 <= red <= 3 else ('more than the seed' if red > 3 else 'no')} |"
    ]


def _joint_rows(a: dict, seeds, nums: dict) -> list[str]:
    """The joint anchor against FP32, over the seeds, and the one-lever anchors."""
    lines = []
    j, base = a["joint"], a["dense_fp32"]
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
    return lines


def _best_joint_row(grid, gbase, nums: dict) -> list[str]:
    joint = [r for r in grid if r["w_bits"] < 32 and r["block_compression"] > 1]
    ok = [r for r in joint if r["test_accuracy"] >= gbase["test_accuracy"] - 0.01]
    if not ok:
        return []
    best = max(ok, key=lambda r: r["weight_compression"])
    nums["best_joint"] = best
    return [
        f"| best joint setting (seed: 2/2/4X) | highest compression within 1 point on the "
        f"grid: w{best['w_bits']:g}/a{best['a_bits']:g}/{best['block_compression']:g}X, "
        f"{pct(best['test_accuracy'])}, {best['weight_compression']:.1f}X | "
        f"{'yes' if (best['w_bits'], best['block_compression']) == (2, 4) else 'differs'}"
        " |"
    ]


def _shape_rows(shapes) -> list[str]:
    lines = []
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
    return lines


def _pareto_row(grid, gpareto, nums: dict) -> list[str]:
    tot = [r for r in gpareto if r["frontier"] == "total"]
    wt = [r for r in gpareto if r["frontier"] == "weight"]
    hi_t = sum(r["block_compression"] >= 8 for r in tot)
    hi_w = sum(r["block_compression"] >= 8 for r in wt)
    nums["pareto"] = (len(wt), len(tot))
    return [
        f"| Pareto-optimal set: 11 designs; activation memory matters at high sparsity | "
        f"{len(grid)} designs → {len(wt)} Pareto-optimal on weight memory, {len(tot)} on "
        f"weights + activations; designs with >= 8X blocks: {hi_w} → {hi_t} | "
        f"{'yes' if hi_t < hi_w else 'partly'} |"
    ]


_LEVERS = {
    "max_scale": "max-abs step instead of learned (LSQ)",
    "fixed_clip": "fixed activation clip instead of learned (PACT)",
    "no_prox": "no proximal block lasso before pruning",
    "balanced": "balanced blocks (equal per block row)",
    "long_ft": "45 epochs (31 of fine-tuning) instead of 30",
    "distill": "distillation from the FP32 anchor (weight 0.7, T=4)",
    "f32_grads": "float32 backward matmuls instead of bfloat16 (quant.bf16_grads)",
    "init_fp32": "started from the FP32 anchor's weights (init_from), 30 more epochs",
}


def _lever_table(levers: dict, j: dict, seeds) -> list[str]:
    """The levers on the joint setting, one change each, as a table after the claims."""
    spread = ""
    if len(seeds) > 1:
        accs = [f - g / 100 for _, f, g in seeds]
        spread = (
            f" for scale, the joint recipe itself spans {100 * (max(accs) - min(accs)):.2f}"
            f" points over {len(seeds)} seeds"
        )
    lines = [
        "",
        f"Levers on the joint 2/2/4X setting (one change each, seed 0){';' if spread else ''}"
        f"{spread}:",
        "",
        "| lever | test accuracy | change vs joint |",
        "|---|---|---|",
        f"| joint recipe (LSQ steps, PACT clips, prox, 30 epochs, bfloat16 backward) | "
        f"{pct(j['test_accuracy'])} | — |",
    ]
    for k, r in levers.items():
        d = 100 * (r["test_accuracy"] - j["test_accuracy"])
        lines.append(f"| {_LEVERS.get(k, k)} | {pct(r['test_accuracy'])} | {d:+.2f} points |")
    return lines


def plot_anchors(results: Path, out: Path | None = None):
    """Accuracy against weight memory for the anchors and the grid, one picture (study.png),
    with the grid's Pareto front (least weight memory, most accuracy) drawn and labelled.

    Args:
      results: the experiments/results directory.
      out: where to save the picture (None: not saved).

    Returns:
      The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    from qsparse import pareto

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    grid = [
        r
        for r in _csv(results / "grid" / "results.csv")
        if str(r.get("diverged", "false")).lower() != "true" and math.isfinite(r["test_accuracy"])
    ]
    if grid:
        ax.scatter(
            [r["weight_memory_bits"] / 8192 for r in grid],
            [100 * r["test_accuracy"] for r in grid],
            s=12,
            c="0.7",
            label=f"grid 784-256-256-10, 8 epochs ({len(grid)} designs)",
        )
        front = pareto.pareto_front(grid, {"weight_memory_bits": "min", "test_accuracy": "max"})
        fx = [grid[i]["weight_memory_bits"] / 8192 for i in front]
        fy = [100 * grid[i]["test_accuracy"] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", lw=1.2, zorder=2)
        ax.scatter(
            fx,
            fy,
            s=24,
            color="tab:red",
            edgecolor="black",
            lw=0.5,
            zorder=3,
            label=f"Pareto front of the grid ({len(front)} designs)",
        )
        for i, x, y in zip(front, fx, fy):
            r = grid[i]
            text = f"w{r['w_bits']:g}/a{r['a_bits']:g}/{r['block_compression']:g}x"
            ax.annotate(text, (x, y), xytext=(3, -9), textcoords="offset points", fontsize=6)
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
                zorder=4,
            )
    ax.set_xscale("log")
    ax.set_xlabel("weight memory (KiB, codes + index + scales + biases)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], 70))
    ax.set_title("Fashion-MNIST MLPs: test accuracy vs weight memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=120)
    return fig


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
