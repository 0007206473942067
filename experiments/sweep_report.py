"""A sweep's results: results.csv and pareto.csv, the Pareto fronts, their plots and summary.md.

Every function here reads or writes result rows (one dict per setting, :data:`COLUMNS`); none
trains. ``experiments.sweep`` re-exports the public names.

A design trained with several seeds (the sweep's ``seeds`` axis) is one row of
:func:`design_rows`: its test accuracy is the mean over the seeds, with their standard
deviation; the fronts, pareto.csv, the plots (with error bars) and summary.md are on these
means, and each design also says on how many seeds' own fronts it is (means.csv).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

TIMING_COLUMNS = ("train_seconds", "examples_per_second")
COLUMNS = (
    "setting",
    "chunk",
    "model",
    "arch",
    "hidden",
    "seed",
    "w_bits",
    "a_bits",
    "block_compression",
    "learning_rate",
    "prox_strength",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "block_sparsity",
    "weight_memory_bits",
    "fp32_weight_memory_bits",
    "weight_compression",
    "codes_bits",
    "index_bits",
    "scale_bits",
    "other_bits",
    "peak_activation_bits",
    "total_activation_bits",
    "total_memory_bits",
    "num_params",
    "steps",
    "train_seconds",
    "examples_per_second",
    "diverged",
    "diverged_step",
)
# Counts: every bit total and bit width, and the ids and step counts.
_INT_COLUMNS = {c for c in COLUMNS if c.endswith("_bits")} | {
    "setting",
    "chunk",
    "seed",
    "num_params",
    "steps",
    "diverged_step",
}
# A design over its seeds: the columns added to COLUMNS (see design_rows).
SEED_COLUMNS = ("seeds", "test_accuracy_std", "front_total_seeds", "front_weight_seeds")
DESIGN_COLUMNS = (*COLUMNS, *SEED_COLUMNS)
# What tells designs apart; the seed does not.
DESIGN_KEYS = (
    "model",
    "arch",
    "hidden",
    "w_bits",
    "a_bits",
    "block_compression",
    "learning_rate",
    "prox_strength",
)
_INT_COLUMNS |= {"seeds", "front_total_seeds", "front_weight_seeds"}
_TEXT_COLUMNS = {"model", "arch", "hidden", "frontier"}
FRONTIERS = {"total": "total_memory_bits", "weight": "weight_memory_bits"}
PLOTS = {"total": "pareto.png", "weight": "pareto_weight.png"}
# Result names an older sweep was written with (chunks, CSVs), and their current names.
RENAMED = {"compression": "block_compression", "activation_memory_bits": "peak_activation_bits"}


def label(row: Mapping, with_model: bool = False) -> str:
    """A design's short name, e.g. ``w2/a2/4x`` (after its model variant's name)."""
    from qsparse import pareto

    # default_label names the block compression "compression" (its "w2/a2/4x" form).
    block = row.get("block_compression", row.get("compression"))  # older CSVs: "compression"
    text = pareto.default_label({**row, "compression": block})
    return f"{row['model']} {text}" if with_model else text


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float
    return str(v)


def write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    """Writes rows to a CSV file (floats in full precision), atomically.

    Args:
      path: the file.
      rows: mappings holding every column.
      columns: column order.
    """
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in columns])
    os.replace(tmp, path)


def read_results(path) -> list[dict]:
    """Reads results.csv or pareto.csv back with typed values.

    Args:
      path: the CSV file.

    Returns:
      One dict per row: ints, floats, bools (``diverged``) and strings as written (the
      columns of a file written before a rename under their current names).
    """
    out = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                k = RENAMED.get(k, k)
                if k in _TEXT_COLUMNS:
                    row[k] = v
                elif k == "diverged":
                    row[k] = v == "true"
                elif k in _INT_COLUMNS:
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            out.append(row)
    return out


def fronts(rows: Sequence[Mapping]) -> dict[str, list[int]]:
    """The two Pareto fronts of a sweep: accuracy (max) against total / weight memory (min).

    Diverged settings are never on a front.

    Args:
      rows: result rows.

    Returns:
      ``{"total": [...], "weight": [...]}``, indices into ``rows`` in memory order.
    """
    from qsparse import pareto

    ok = [{**r, "test_accuracy": None if r["diverged"] else r["test_accuracy"]} for r in rows]
    return {
        name: pareto.pareto_front(ok, {col: "min", "test_accuracy": "max"})
        for name, col in FRONTIERS.items()
    }


def design_rows(rows: Sequence[Mapping]) -> list[dict]:
    """One row per design (:data:`DESIGN_KEYS`), its seeds' runs summarised.

    The row is the design's lowest-seed run (its setting id, memory and breakdown; seeds
    differ in memory only where the proximal step zeroed extra blocks) with ``test_accuracy``,
    ``test_loss`` and ``train_loss`` replaced by their means over the seeds, and
    :data:`SEED_COLUMNS`: ``seeds`` (how many), ``test_accuracy_std`` (sample standard
    deviation; NaN for one seed), and ``front_total_seeds`` / ``front_weight_seeds`` (on how
    many of the seeds' own fronts the design is). A design with a diverged seed is diverged.

    Args:
      rows: result rows (one per run).

    Returns:
      The design rows, in order of each design's first run.
    """
    import numpy as np

    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in DESIGN_KEYS), []).append(r)
    on_front = {(key, name): 0 for key in groups for name in FRONTIERS}
    for seed in sorted({r["seed"] for r in rows}):
        runs = [r for r in rows if r["seed"] == seed]
        for name, idx in fronts(runs).items():
            for i in idx:
                on_front[tuple(runs[i][k] for k in DESIGN_KEYS), name] += 1
    out = []
    for key, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        acc = np.array([r["test_accuracy"] for r in runs], np.float64)
        row = {
            **runs[0],
            "seeds": len(runs),
            "test_accuracy_std": float(acc.std(ddof=1)) if len(runs) > 1 else float("nan"),
            "diverged": any(r["diverged"] for r in runs),
            "front_total_seeds": on_front[key, "total"],
            "front_weight_seeds": on_front[key, "weight"],
        }
        for col in ("test_accuracy", "test_loss", "train_loss"):
            row[col] = float(np.mean([r[col] for r in runs]))
        out.append(row)
    return out


def plot_fronts(rows: Sequence[Mapping], front: Mapping[str, Sequence[int]]) -> dict:
    """The two Pareto plots: every non-diverged design, the front highlighted and labelled.

    Rows with a ``test_accuracy_std`` (:func:`design_rows` over several seeds) get error bars
    of one standard deviation.

    Args:
      rows: result rows, or design rows.
      front: from :func:`fronts`.

    Returns:
      ``{"total": Figure, "weight": Figure}`` (matplotlib figures, no pyplot state).
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from qsparse import pareto

    many = len({r["model"] for r in rows}) > 1
    kib = 8 * 1024
    pos, shown = {}, []
    for i, r in enumerate(rows):
        if not r["diverged"]:
            pos[i] = len(shown)
            shown.append({**r, **{f"{n} memory (KiB)": r[c] / kib for n, c in FRONTIERS.items()}})
    figs = {}
    for name, title in (
        ("total", "accuracy vs total memory (weights + activations)"),
        ("weight", "accuracy vs weight memory"),
    ):
        fig = pareto.plot_front(
            shown,
            f"{name} memory (KiB)",
            "test_accuracy",
            [pos[i] for i in front[name]],
            label_fn=lambda r: label(r, many),
            title=title,
            yerr="test_accuracy_std" if any(r.get("seeds", 1) > 1 for r in shown) else None,
        )
        for ax in fig.axes:
            if ax.get_xscale() == "log":
                # Labels at 1-2-5 steps: a sweep spans one to three decades, where the default
                # labels either overlap (minor ticks) or leave a single label (major only).
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
        figs[name] = fig
    return figs


def plot_block_masks(run, state, title: str = ""):
    """Block masks of one trained design: a heatmap per block-sparse layer (rows: input
    blocks, columns: output blocks; a block is kept when its norm is not zero), with a
    colorbar naming the two colours.

    Args:
      run: the design's run (e.g. from ``experiments.sweep.load_setting``).
      state: its train state.
      title: the figure's title.

    Returns:
      A matplotlib ``Figure`` (no pyplot state); its last axes is the colorbar.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from qsparse import sparsity, training, wrap

    params = state.params[training.PARAMS]
    layers = [lp for lp in run.plan.layers.values() if lp.rule.block_shape is not None]
    n = max(len(layers), 1)
    fig = Figure(figsize=(3.2 * n + 1.2, 3.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    cmap = ListedColormap(["#f2f2f2", "#1f1f1f"])  # pruned, kept
    image = None
    for ax, lp in zip(axes, layers):
        kernel = np.asarray(wrap.get_path(params, lp.path))
        kept = np.asarray(sparsity.block_norms(kernel, lp.rule.block_shape)) != 0
        image = ax.imshow(kept, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        m, k = sparsity.matrix_shape(kernel.shape)
        ax.set_title(
            f"{lp.name} {m}x{k}\nblocks {tuple(lp.rule.block_shape)}: {kept.mean():.0%} kept",
            fontsize=9,
        )
        ax.set_xlabel("output block")
        ax.set_ylabel("input block")
    if image is None:
        axes[0].set_title("this design has no block-sparse layer")
        axes[0].set_axis_off()
    else:
        bar = fig.colorbar(image, ax=list(axes), ticks=[0.25, 0.75], shrink=0.8)
        bar.ax.set_yticklabels(["pruned", "kept"])
    if title:
        fig.suptitle(title)
    return fig


def write_reports(workdir, rows: Sequence[Mapping]) -> None:
    """Writes results.csv, pareto.csv, pareto.png, pareto_weight.png and summary.md, and
    means.csv when a design has several seeds.

    results.csv has one row per run; the fronts and everything after are on the design rows
    (:func:`design_rows`).

    Args:
      workdir: the sweep directory.
      rows: result rows (as ``experiments.sweep.run_sweep`` returns them).
    """
    workdir = Path(workdir)
    rows = list(rows)
    write_csv(workdir / "results.csv", rows, COLUMNS)
    designs = design_rows(rows)
    if any(d["seeds"] > 1 for d in designs):
        write_csv(workdir / "means.csv", designs, DESIGN_COLUMNS)
    front = fronts(designs)
    picked = [{"frontier": name, **designs[i]} for name, idx in front.items() for i in idx]
    write_csv(workdir / "pareto.csv", picked, ("frontier", *DESIGN_COLUMNS))

    for name, fig in plot_fronts(designs, front).items():
        fig.savefig(workdir / PLOTS[name], dpi=120)
    (workdir / "summary.md").write_text(summary_markdown(designs, front))


def summary_markdown(rows: Sequence[Mapping], front: Mapping[str, Sequence[int]]) -> str:
    """The summary.md text: sweep counts and the Pareto designs as Markdown tables.

    Over several seeds (design rows) each front design shows its accuracy as mean ± standard
    deviation and on how many seeds' own fronts it is; a line per front names the designs on
    it in every seed and those on it in only some.

    Args:
      rows: result rows, or design rows (:func:`design_rows`).
      front: from :func:`fronts` on the same rows.

    Returns:
      Markdown text.
    """
    from qsparse import pareto

    kib = 8 * 1024
    seeded = any(r.get("seeds", 1) > 1 for r in rows)
    table_rows = [
        {
            **r,
            "weight_KiB": r["weight_memory_bits"] / kib,
            "activation_KiB": r["peak_activation_bits"] / kib,
            "total_KiB": r["total_memory_bits"] / kib,
            "test_accuracy_mean_std": f"{r['test_accuracy']:.4f} ± {r['test_accuracy_std']:.4f}"
            if seeded
            else None,
        }
        for r in rows
    ]
    cols = [
        "setting",
        "model",
        "hidden",
        "w_bits",
        "a_bits",
        "block_compression",
        *(["test_accuracy_mean_std"] if seeded else ["seed", "test_accuracy"]),
        "weight_KiB",
        "activation_KiB",
        "total_KiB",
        "weight_compression",
        "block_sparsity",
    ]
    diverged = sum(bool(r["diverged"]) for r in rows)
    models = sorted({(r["model"], r["hidden"]) for r in rows})
    many = len({m for m, _ in models}) > 1
    runs = (
        f"{len(rows)} designs x {max(r['seeds'] for r in rows)} seeds"
        if seeded
        else f"{len(rows)} settings"
    )
    lines = [
        "# Sweep summary",
        "",
        f"{runs} ({diverged} diverged) over {len(models)} model variant(s): "
        + ", ".join(f"{m} ({h})" for m, h in models)
        + ".",
        "`block_compression` is the design's target ratio of weight blocks to kept blocks; "
        "`weight_compression` is FP32 dense weight memory over this design's weight memory "
        "(codes, block index, scales, biases); `activation_KiB` is the peak activation "
        "memory (the largest input and output buffers of one layer).",
    ]
    if seeded:
        lines.append(
            "Accuracies are the mean ± standard deviation over the seeds; the fronts are on the "
            "means; `seeds_on_front` counts the seeds on whose own front the design is."
        )
    for name, title in (
        ("total", "test accuracy vs total memory (weights + activations)"),
        ("weight", "test accuracy vs weight memory"),
    ):
        on = f"front_{name}_seeds"
        body = [{**r, "seeds_on_front": r.get(on)} for r in table_rows]
        lines += [
            "",
            f"## Pareto front: {title}, {len(front[name])} designs",
            "",
            pareto.front_table(body, front[name], cols + ["seeds_on_front"] * seeded),
        ]
        if seeded:
            seeds_on = {i: rows[i][on] for i in front[name]}
            every = [label(rows[i], many) for i, k in seeds_on.items() if k == rows[i]["seeds"]]
            some = [
                f"{label(rows[i], many)} ({k}/{rows[i]['seeds']})"
                for i, k in seeds_on.items()
                if k < rows[i]["seeds"]
            ]
            lines += [
                "",
                f"On the front of every seed: {', '.join(every) or 'none'}. "
                f"On some seeds' fronts only: {', '.join(some) or 'none'}.",
            ]
    return "\n".join(lines + [""])
