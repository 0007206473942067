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


RULE = (
    "Verdicts: a claim **agrees** when our mean over the seeds is on the claim's side of its "
    "threshold by more than twice the standard error of that mean (of the seed-paired "
    "difference where two designs are compared), **differs** when it is on the other side by "
    "more than that, and is **not decided at this noise** otherwise; claims about the Pareto "
    "set agree or differ when every seed says so. One seed has no standard error: its verdict "
    "says so."
)


def verdict(margin: float, se: float) -> str:
    """The verdict for a claim whose measured margin (> 0: the claim holds) has standard error
    ``se`` (NaN: one seed).

    Args:
      margin: how far the mean is on the claim's side of its threshold.
      se: standard error of the margin.

    Returns:
      ``"agrees"``, ``"differs"`` or ``"not decided at this noise"`` (with ``"(one seed)"``
      after the point estimate's verdict when ``se`` is NaN).
    """
    if not math.isfinite(se):
        return ("agrees" if margin > 0 else "differs") + " (one seed)"
    if margin > 2 * se:
        return "agrees"
    if margin < -2 * se:
        return "differs"
    return "not decided at this noise"


def _stats(xs) -> tuple[float, float, float]:
    """``(mean, sample std, standard error of the mean)``; std and se NaN for one value."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, sd, sd / math.sqrt(n)


def _pm(mean: float, sd: float, scale: float = 100.0, unit: str = "%") -> str:
    """``mean ± sd`` (the sd left out when NaN), scaled (100: accuracy as a percentage)."""
    text = f"{scale * mean:.2f}{unit}"
    return text + (f" ± {scale * sd:.2f}" if math.isfinite(sd) else "")


_DESIGN = ("model", "w_bits", "a_bits", "block_compression")


def design_key(d: dict) -> tuple:
    """What identifies a design across seeds (and across reruns): model, bits, blocks."""
    return tuple(d.get(k) for k in _DESIGN)


def _designs(runs: list[dict]) -> list[dict]:
    """One row per design (model, bits, block compression) of a sweep's runs: the first run's
    fields, ``accs`` ({seed: accuracy}) and ``test_accuracy`` as the mean over the seeds."""
    out: dict[tuple, dict] = {}
    for r in runs:
        if str(r.get("diverged", "false")).lower() == "true":
            continue
        d = out.setdefault(design_key(r), {**r, "accs": {}})
        d["accs"][int(r.get("seed", 0))] = r["test_accuracy"]
    for d in out.values():
        d["test_accuracy"], d["std"], d["se"] = _stats(list(d["accs"].values()))
    return list(out.values())


def _paired(a: dict, b: dict, threshold: float = 0.0) -> tuple[float, float]:
    """Margin and its standard error of ``a - b - threshold`` over their common seeds
    (accuracy in points)."""
    seeds = sorted(set(a["accs"]) & set(b["accs"]))
    diffs = [100 * (a["accs"][s] - b["accs"][s]) - threshold for s in seeds]
    m, _, se = _stats(diffs)
    return m, se


def _name(d: dict) -> str:
    return f"w{d['w_bits']:g}/a{d['a_bits']:g}/{d['block_compression']:g}X"


def _within(designs, base, points=1.0):
    """The designs whose mean accuracy is within ``points`` of ``base``'s mean."""
    return [d for d in designs if d["test_accuracy"] >= base["test_accuracy"] - points / 100]


def _seed_gaps(anchors: Path) -> list[tuple[int, float, float]]:
    """``(seed, FP32 accuracy, gap in points)`` for every seed with both anchors.

    Seed 0 is ``dense_fp32.json`` / ``joint.json``; seed ``s`` is ``*_seed{s}.json``.
    """
    dense, joint = _by_seed(anchors, "dense_fp32"), _by_seed(anchors, "joint")
    return [
        (
            s,
            dense[s]["test_accuracy"],
            100 * (dense[s]["test_accuracy"] - joint[s]["test_accuracy"]),
        )
        for s in sorted(set(dense) & set(joint))
    ]


MLP = "MLP 784-512-512-10"
GRID_MLP = "MLP 784-256-256-10 grid"


def build(results: Path, levers_table: bool = True) -> tuple[str, dict]:
    """Builds the Markdown results section from the result files.

    Args:
      results: the experiments/results directory.
      levers_table: the levers' table after the claims (else a line pointing to summary.md).

    Returns:
      ``(markdown, numbers)``.
    """
    a = {n: _json(results / "anchors" / f"{n}.json") for n in ("dense_fp32", "joint")}
    levers = {p.stem: _json(p) for p in sorted((results / "levers").glob("*.json"))}
    grid_runs = _csv(results / "grid" / "results.csv")
    grid = _designs(grid_runs)
    shapes = _designs(_csv(results / "shapes" / "results.csv"))
    seeds = _seed_gaps(results / "anchors")
    gbase = next((d for d in grid if _name(d) == "w32/a32/1X"), None)
    nums: dict = {}
    lines = [
        "| claim (seed) | network | our measurement (mean ± std over seeds) | verdict |",
        "|---|---|---|---|",
    ]
    lines += _joint_rows(a, seeds, nums) + _target_row(results, nums) + _cnn_rows(results)
    if gbase:
        lines += _quant_only_row(grid, gbase, nums) + _sparse_only_row(grid, gbase, nums)
        lines += _optimal_row(grid, grid_runs, gbase, nums)
    lines += _cnn_grid_rows(results)
    lines += _shape_rows(shapes)
    lines += _shape_rows(_designs(_csv(results / "cnn_shapes" / "results.csv")), CNN_SHAPES)
    if grid_runs:
        lines += _pareto_rows(grid_runs, nums)
    lines += ["", RULE]
    if levers and a["joint"] and levers_table:
        lines += _lever_table(results)
    elif levers and a["joint"]:
        lines[-1] += (
            f" The levers tried on the joint setting ({len(levers)}), each over its seeds: "
            "[experiments/results/summary.md](experiments/results/summary.md)."
        )
    return "\n".join(lines) + "\n", nums


def _joint_rows(a: dict, seeds, nums: dict) -> list[str]:
    """The joint anchor against FP32 over the seeds (paired by seed)."""
    j, base = a["joint"], a["dense_fp32"]
    if not (j and base):
        return []
    gaps = [g for _, _, g in seeds] or [100 * (base["test_accuracy"] - j["test_accuracy"])]
    fp = [f for _, f, _ in seeds] or [base["test_accuracy"]]
    jt = [f - g / 100 for f, g in zip(fp, gaps)]
    gap, gsd, gse = _stats(gaps)
    nums.update(joint_gaps=gaps, joint_gap=gap, joint_compression=j["weight_compression"])
    ok = j["weight_compression"] >= 50
    v = verdict(1.5 - gap, gse) if ok else "differs"
    return [
        f"| FP32 dense baseline | {MLP} | {_pm(*_stats(fp)[:2])}, "
        f"{base['weight_memory_bits'] / 8 / 1024:.0f} KiB of weights | — |",
        f"| joint 2-bit W / 2-bit A / 4X blocks on every layer: about 50X at accuracy close to "
        f"FP32 (here: 50X or more, within 1.5 points) | {MLP} | {_pm(*_stats(jt)[:2])}, "
        f"{_pm(gap / 100, gsd / 100, unit=' points')} below FP32 (seeds "
        f"{', '.join(f'{g:.2f}' for g in gaps)}), **{j['weight_compression']:.1f}X** weight "
        f"memory (index, scales, biases counted) | {v} |",
    ]


def _target_row(results: Path, nums: dict) -> list[str]:
    """This study's own target for the MLP: 2/2/4X within 1 point of FP32 at 60X or more,
    with int8 biases (the ``bias8`` lever), paired by seed with the FP32 anchors."""
    runs = _by_seed(results / "levers", "bias8")
    fp32 = _by_seed(results / "anchors", "dense_fp32")
    seeds = sorted(set(runs) & set(fp32))
    if not seeds:
        return []
    gaps = [100 * (fp32[s]["test_accuracy"] - runs[s]["test_accuracy"]) for s in seeds]
    gap, sd, se = _stats(gaps)
    comp = min(runs[s]["weight_compression"] for s in seeds)
    nums.update(bias8_gap=gap, bias8_compression=comp)
    v = verdict(1.0 - gap, se) if comp >= 60 else "differs"
    return [
        f"| (this study's target) 2/2/4X on every layer within 1 point of FP32 at 60X or more | "
        f"{MLP}, int8 biases | {_pm(gap / 100, sd / 100, unit=' points')} below FP32 (seeds "
        f"{', '.join(f'{g:.2f}' for g in gaps)}), **{comp:.1f}X** | {v} |"
    ]


def _cnn_rows(results: Path) -> list[str]:
    """The headline claim on ResNet-8 (scripts/resnet_study.sh), over the seeds each run has,
    paired by seed with the FP32 runs; each of the study's later recipes replaces the one it
    extends once it has results."""
    res = results / "resnet"
    recipe = (
        "gradient passed outside the range, four 2-bit levels, column-balanced blocks, weight"
        " decay {}"
    ).format
    recal = ", batch statistics re-estimated"
    later = (
        ("w2a2_4x_recal_wd06", "fp32", recipe(0.6) + recal),
        ("w2a2_4x_recal", "fp32", recipe(0.3) + recal),
        ("w2a2_4x_ste_midrise_columns_wd03", "fp32", recipe(0.3)),
    )
    lines = []
    for name, base, how in (
        ("w2a2_4x", "fp32", "from scratch"),
        next((r for r in later if _by_seed(res, r[0])), later[-1]),
    ):
        runs, fp32 = _by_seed(res, name), _by_seed(res, base)
        seeds = sorted(set(runs) & set(fp32))
        if not seeds:
            continue
        gaps = [100 * (fp32[s]["test_accuracy"] - runs[s]["test_accuracy"]) for s in seeds]
        gap, sd, se = _stats(gaps)
        acc = _stats([runs[s]["test_accuracy"] for s in seeds])
        ref = _stats([fp32[s]["test_accuracy"] for s in seeds])
        comp = min(runs[s]["weight_compression"] for s in seeds)
        label = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
        lines.append(
            f"| joint 2/2/4X on every layer: about 50X at accuracy close to FP32 | ResNet-8 "
            f"(BatchNorm, residual adds), 12 epochs, {how} | {_pm(*acc[:2])}, "
            f"{_pm(gap / 100, sd / 100, unit=' points')} below FP32 ({_pm(*ref[:2])}; "
            f"{label}), **{comp:.1f}X** weight memory (every parameter and batch statistic "
            f"counted) | {verdict(1.5 - gap, se) if comp >= 50 else 'differs'} |"
        )
    return lines


CNN_GRID = "LeNet 16/32/256 grid, 3 epochs"
CNN_SHAPES = "CNNs, 3 epochs: LeNet 8/16/32 dense, LeNet 16/32/64 and 8-layer VGG sparse"


def _cnn_grid_rows(results: Path) -> list[str]:
    """The grid claims on the CNN grid (``cnn_grid``), and its 2/2/4X against its FP32."""
    runs = _csv(results / "cnn_grid" / "results.csv")
    grid = _designs(runs)
    base = next((d for d in grid if _name(d) == "w32/a32/1X"), None)
    joint = next((d for d in grid if _name(d) == "w2/a2/4X"), None)
    if not (base and joint):
        return []
    gap, se = _paired(base, joint)
    comp = base["weight_memory_bits"] / joint["weight_memory_bits"]
    v = verdict(1.5 - gap, se) if comp >= 50 else "differs"
    scratch: dict = {}
    return [
        f"| joint 2-bit W / 2-bit A / 4X blocks on every layer: about 50X at accuracy close to "
        f"FP32 | {CNN_GRID} | {_pm(joint['test_accuracy'], joint['std'])} against FP32 "
        f"{_pm(base['test_accuracy'], base['std'])}, {gap:.2f} points below, **{comp:.1f}X** | "
        f"{v} |",
        *_quant_only_row(grid, base, scratch, CNN_GRID),
        *_sparse_only_row(grid, base, scratch, CNN_GRID),
        *_optimal_row(grid, runs, base, scratch, CNN_GRID),
    ]


def _quant_only_row(grid, gbase, nums: dict, network: str = "") -> list[str]:
    quant = [d for d in grid if d["block_compression"] == 1 and d["w_bits"] < 32]
    q = [d for d in _within(grid, gbase) if d in quant]
    if not quant:
        return []
    claim = "| quantization only: about 16X (here: 12X or more within 1 point of FP32) | "
    if not q:  # none within 1 point: the closest one, and by how much it misses
        best = max(quant, key=lambda d: d["test_accuracy"])
        red = gbase["weight_memory_bits"] / best["weight_memory_bits"]
        return [
            f"{claim}{network or GRID_MLP} | no quantization-only design within 1 point of the "
            f"grid's FP32 ({_pm(gbase['test_accuracy'], gbase['std'])}); the closest: "
            f"w{best['w_bits']:g}/a{best['a_bits']:g}, {_pm(best['test_accuracy'], best['std'])}"
            f", **{red:.1f}X** | {verdict(*_paired(best, gbase, -1.0))} |"
        ]
    best = min(q, key=lambda d: (d["weight_memory_bits"], -d["test_accuracy"]))
    red = gbase["weight_memory_bits"] / best["weight_memory_bits"]
    nums["quant_only_reduction"] = red
    v = verdict(*_paired(best, gbase, -1.0)) if red >= 12 else "differs"
    return [
        f"{claim}{network or GRID_MLP} | least weight memory within 1 point of the grid's FP32 "
        f"({_pm(gbase['test_accuracy'], gbase['std'])}): w{best['w_bits']:g}/a"
        f"{best['a_bits']:g}, {_pm(best['test_accuracy'], best['std'])}, **{red:.1f}X** | {v} |"
    ]


def _sparse_only_row(grid, gbase, nums: dict, network: str = "") -> list[str]:
    s = [d for d in _within(grid, gbase) if d["w_bits"] == 32 and d["a_bits"] == 32]
    best = max(s, key=lambda d: d["block_compression"])
    red = gbase["weight_memory_bits"] / best["weight_memory_bits"]
    nums["sparse_only_reduction"] = red
    v = verdict(*_paired(best, gbase, -1.0)) if red >= 1.5 else "differs"
    return [
        f"| sparsity only: about 2X (here: 1.5X or more within 1 point of FP32) | "
        f"{network or GRID_MLP} | "
        f"highest block compression within 1 point: {best['block_compression']:g}X blocks, "
        f"{_pm(best['test_accuracy'], best['std'])}, **{red:.1f}X** weight memory (index "
        f"counted) | {v} |"
    ]


def _optimal_row(grid, runs, gbase, nums: dict, network: str = "") -> list[str]:
    """2/2/4X optimal: on the weight-memory Pareto front of every seed."""
    from qsparse import pareto

    target = next((d for d in grid if _name(d) == "w2/a2/4X"), None)
    joint = [d for d in _within(grid, gbase) if d["w_bits"] < 32 and d["block_compression"] > 1]
    if target is None:
        return []
    on = []
    for seed in sorted({int(r.get("seed", 0)) for r in runs}):
        rs = [r for r in runs if int(r.get("seed", 0)) == seed]
        rs = [r for r in rs if str(r.get("diverged", "false")).lower() != "true"]
        front = pareto.pareto_front(rs, {"weight_memory_bits": "min", "test_accuracy": "max"})
        on.append(any(_name(rs[i]) == "w2/a2/4X" for i in front))
    best = max(joint, key=lambda d: d["weight_compression"]) if joint else None
    nums["best_joint"] = best
    v = "agrees" if all(on) else ("differs" if not any(on) else "not decided at this noise")
    if all(target["weight_memory_bits"] < d["weight_memory_bits"] for d in grid if d is not target):
        v = "not tested: no smaller design in this grid"  # the least memory is on every front
    text = (
        f"w2/a2/4X on the weight-memory Pareto front in {sum(on)} of {len(on)} seeds "
        f"({_pm(target['test_accuracy'], target['std'])}, "
        f"{gbase['weight_memory_bits'] / target['weight_memory_bits']:.1f}X)"
    )
    if best:
        text += (
            f"; highest compression within 1 point of FP32: {_name(best)}, "
            f"{_pm(best['test_accuracy'], best['std'])}, {best['weight_compression']:.1f}X"
        )
    return [f"| 2/2/4X is the optimal joint design | {network or GRID_MLP} | {text} | {v} |"]


def _shape_rows(shapes, network: str = "MLPs") -> list[str]:
    """Deep-sparse against shallow-dense at w2/a2 and w32/a32, paired by seed."""
    lines = []
    for bits in ((2, 2), (32, 32)):
        by = {str(d["model"]): d for d in shapes if (d["w_bits"], d["a_bits"]) == bits}
        deep, shallow = by.get("deep-sparse"), by.get("shallow-dense")
        if not (deep and shallow):
            continue
        desc = ", ".join(
            f"{m} {_pm(d['test_accuracy'], d['std'])} at "
            f"{d['weight_memory_bits'] / 8 / 1024:.1f} KiB"
            for m, d in sorted(by.items(), key=lambda kv: -kv[1]["test_accuracy"])
        )
        lines.append(
            f"| deep-sparse beats shallow-dense at the same memory | {network}, "
            f"w{bits[0]}/a{bits[1]}, matched kept weights | {desc} | "
            f"{verdict(*_paired(deep, shallow))} |"
        )
    return lines


def _pareto_rows(runs, nums: dict) -> list[str]:
    """About 11 Pareto designs; activation memory small for the low-sparsity ones and not
    negligible for the high-sparsity ones: each seed's grid on its own."""
    from qsparse import pareto

    sizes, shares = [], []
    for seed in sorted({int(r.get("seed", 0)) for r in runs}):
        rs = [
            r
            for r in runs
            if int(r.get("seed", 0)) == seed and str(r.get("diverged", "false")).lower() != "true"
        ]
        wt = pareto.pareto_front(rs, {"weight_memory_bits": "min", "test_accuracy": "max"})
        tot = pareto.pareto_front(rs, {"total_memory_bits": "min", "test_accuracy": "max"})
        sizes.append((len(wt), len(tot)))
        share = {i: rs[i]["peak_activation_bits"] / rs[i]["total_memory_bits"] for i in wt}
        lo = [share[i] for i in wt if rs[i]["block_compression"] <= 2]
        hi = [share[i] for i in wt if rs[i]["block_compression"] >= 8]
        if lo and hi:
            shares.append((sum(lo) / len(lo), sum(hi) / len(hi)))
    nums["pareto"] = sizes

    def every(ok: list[bool]) -> str:
        return "agrees" if all(ok) else ("differs" if not any(ok) else "not decided at this noise")

    n_designs = len({tuple(r.get(k) for k in _DESIGN) for r in runs})
    lines = [
        f"| about 11 Pareto-optimal designs (here: 7 to 15 on weight memory, every seed) | "
        f"{GRID_MLP} | {n_designs} designs → Pareto-optimal on weight memory / on weights + "
        f"activations, per seed: {'; '.join(f'{w} / {t}' for w, t in sizes)} | "
        f"{every([7 <= w <= 15 for w, _ in sizes])} |"
    ]
    if shares:
        lines.append(
            "| activation memory changes little for low-sparsity optimal designs and cannot be "
            "ignored for high-sparsity ones (here: a larger share of total memory at >= 8X "
            f"blocks than at <= 2X, every seed) | {GRID_MLP} | peak activations' share of total "
            "memory on the weight-memory front, <= 2X vs >= 8X designs, per seed: "
            + "; ".join(f"{100 * lo:.0f}% vs {100 * hi:.0f}%" for lo, hi in shares)
            + f" | {every([hi > lo for lo, hi in shares])} |"
        )
    return lines


_LEVERS = {
    "max_scale": "max-abs step instead of learned (LSQ)",
    "fixed_clip": "fixed activation clip instead of learned (PACT)",
    "no_prox": "no proximal block lasso before pruning",
    "balanced": "balanced blocks (equal per block row)",
    "long_ft": "45 epochs (31 of fine-tuning) instead of 30",
    "distill": "distillation from the FP32 anchor (weight 0.7, T=4)",
    "f32_grads": "float32 backward matmuls instead of bfloat16 (quant.bf16_grads)",
    "init_fp32": "started from the FP32 anchor's weights (init_from), 30 more epochs",
    "bias8": "int8 biases and one scale per layer instead of float32 (quant.bias_bits=8)",
    "ste": "weight gradient passed outside the quantizer's range (quant.weight_grad=identity)",
}


def _by_seed(directory: Path, stem: str) -> dict[int, dict]:
    """``{seed: result}``: ``{stem}.json`` is seed 0, ``seeds/{stem}_seed{s}.json`` (or
    ``{stem}_seed{s}.json`` beside it) seed ``s``."""
    out = {}
    for f in [directory / f"{stem}.json", *sorted(directory.glob(f"{stem}_seed*.json"))]:
        m = re.fullmatch(rf"{re.escape(stem)}(?:_seed(\d+))?", f.stem)
        if m and f.exists():
            out[int(m.group(1) or 0)] = _json(f)
    for f in sorted((directory / "seeds").glob(f"{stem}_seed*.json")):
        m = re.fullmatch(rf"{re.escape(stem)}_seed(\d+)", f.stem)
        if m:
            out[int(m.group(1))] = _json(f)
    return out


def _lever_table(results: Path) -> list[str]:
    """The levers on the joint setting, one change each, each over the seeds it was run with:
    accuracy, change against the joint recipe and gap to FP32 on the same seeds."""
    anchors = results / "anchors"
    joint, fp32 = _by_seed(anchors, "joint"), _by_seed(anchors, "dense_fp32")
    names = sorted({f.stem for f in (results / "levers").glob("*.json")})

    def row(label: str, runs: dict[int, dict], vs_joint: bool) -> str:
        seeds = sorted(runs)
        acc = [runs[s]["test_accuracy"] for s in seeds]
        m, sd, _ = _stats(acc)
        change = "—"
        if vs_joint:
            d = [100 * (runs[s]["test_accuracy"] - joint[s]["test_accuracy"]) for s in seeds]
            change = f"{_stats(d)[0]:+.2f} points"
        both = [s for s in seeds if s in fp32]
        gap = [100 * (fp32[s]["test_accuracy"] - runs[s]["test_accuracy"]) for s in both]
        gm, gsd, _ = _stats(gap) if gap else (math.nan, math.nan, math.nan)
        gap_text = _pm(gm / 100, gsd / 100, unit=" points") if gap else "—"
        comp = _stats([runs[s]["weight_compression"] for s in seeds])[0]
        return (
            f"| {label} | {', '.join(map(str, seeds))} | {_pm(m, sd)} | {change} | {gap_text} "
            f"| {comp:.1f}X |"
        )

    lines = [
        "",
        "Levers on the joint 2/2/4X setting, one change each, over the seeds each was run with "
        "(changes and gaps compare the same seeds):",
        "",
        "| lever | seeds | test accuracy | change vs joint | gap to FP32 | weight compression |",
        "|---|---|---|---|---|---|",
        row(
            "joint recipe (LSQ steps, PACT clips, prox, 30 epochs, bfloat16 backward)",
            joint,
            False,
        ),
    ]
    for k in names:
        runs = {s: r for s, r in _by_seed(results / "levers", k).items() if s in joint}
        if runs:
            lines.append(row(_LEVERS.get(k, k), runs, True))
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
        d
        for d in _designs(_csv(results / "grid" / "results.csv"))
        if math.isfinite(d["test_accuracy"])
    ]
    if grid:
        seeds = max(len(d["accs"]) for d in grid)
        ax.errorbar(
            [d["weight_memory_bits"] / 8192 for d in grid],
            [100 * d["test_accuracy"] for d in grid],
            yerr=[100 * d["std"] if math.isfinite(d["std"]) else 0.0 for d in grid],
            fmt="o",
            ms=3,
            color="0.6",
            elinewidth=0.8,
            label=f"grid 784-256-256-10, 8 epochs ({len(grid)} designs"
            + (f", mean ± std over {seeds} seeds)" if seeds > 1 else ")"),
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
            label=f"Pareto front of the grid's means ({len(front)} designs)",
        )
        for i, x, y in zip(front, fx, fy):
            text = _name(grid[i]).replace("X", "x")
            ax.annotate(text, (x, y), xytext=(3, -9), textcoords="offset points", fontsize=6)
    for name, mark in (("dense_fp32", "o"), ("joint", "*")):
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
        table, _ = build(results, levers_table=False)
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
