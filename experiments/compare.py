"""Compares two results directories of the study: the committed one and a rerun, say on another CPU.

    python -m experiments.compare experiments/results runs/repro_results

Training on another CPU type rounds differently (other matrix kernels), so a rerun there is not
the same bit for bit; what should hold is that it agrees within the seeds' noise. For every
design of the sweeps (grid, shapes, cnn_grid, cnn_shapes) the rerun's mean accuracy minus the
first's, paired by seed, against twice its standard error; for every single run (anchors,
levers) the difference; and the claims' verdicts (experiments/report.py) side by side.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from experiments import report

SWEEPS = ("grid", "shapes", "cnn_grid", "cnn_shapes")


def design_diffs(a: Path, b: Path) -> list[dict]:
    """Per design present in both sweeps' results.csv: the paired difference ``b - a``.

    Args:
      a: the first results directory.
      b: the second.

    Returns:
      Rows ``{"part", "design", "diff", "se", "beyond"}``: the mean over common seeds of
      ``b``'s accuracy minus ``a``'s in points, its standard error (NaN for one seed) and
      whether it exceeds twice that.
    """
    rows = []
    for part in SWEEPS:
        da, db = _by_design(a / part), _by_design(b / part)
        for k in sorted(set(da) & set(db), key=str):
            diff, se = report._paired(db[k], da[k])
            beyond = math.isfinite(se) and abs(diff) > 2 * se
            rows.append(
                {"part": part, "design": _design_name(db[k]), "diff": diff, "se": se,
                 "beyond": beyond}
            )  # fmt: skip
    return rows


def _by_design(sweep: Path) -> dict:
    """A sweep directory's designs keyed by :func:`report.design_key`."""
    return {report.design_key(d): d for d in report._designs(report._csv(sweep / "results.csv"))}


def _design_name(d: dict) -> str:
    return f"{d.get('model', '')} {report._name(d)}".strip()


def run_diffs(a: Path, b: Path) -> list[tuple[str, float, float]]:
    """``(name, accuracy in a, accuracy in b)`` for every anchor and lever JSON in both."""
    out = []
    for sub in ("anchors", "levers", "levers/seeds"):
        for p in sorted((a / sub).glob("*.json")):
            ra, rb = report._json(p), report._json(b / sub / p.name)
            if ra and rb:
                out.append((f"{sub}/{p.stem}", ra["test_accuracy"], rb["test_accuracy"]))
    return out


def verdicts(results: Path) -> list[tuple[str, str, str]]:
    """``(claim, network, verdict)`` of each row of the claims table built from ``results``."""
    table, _ = report.build(results, levers_table=False)
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("claim (seed)", "---"):
            rows.append((cells[0], cells[1], cells[3]))
    return rows


def compare(a: Path, b: Path) -> str:
    """The Markdown comparison of results directories ``a`` and ``b``.

    Args:
      a: the first results directory (the committed one).
      b: the second (the rerun).

    Returns:
      Three sections: per-sweep summary of the design differences, the single runs, the
      claims' verdicts.
    """
    lines = [
        f"# {b} against {a}",
        "",
        "| sweep | designs | mean abs. difference | largest | beyond 2 standard errors |",
        "|---|---|---|---|---|",
    ]
    diffs = design_diffs(a, b)
    for part in SWEEPS:
        ds = [d for d in diffs if d["part"] == part]
        if not ds:
            continue
        big = max(ds, key=lambda d: abs(d["diff"]))
        mean_abs = sum(abs(d["diff"]) for d in ds) / len(ds)
        beyond = [d["design"] for d in ds if d["beyond"]]
        lines.append(
            f"| {part} | {len(ds)} | {mean_abs:.2f} points | {big['diff']:+.2f} ({big['design']})"
            f" | {len(beyond)}{': ' + ', '.join(beyond) if beyond else ''} |"
        )
    runs = run_diffs(a, b)
    if runs:
        lines += ["", "| run | first | rerun | difference |", "|---|---|---|---|"]
        lines += [
            f"| {n} | {report.pct(x)} | {report.pct(y)} | {100 * (y - x):+.2f} points |"
            for n, x, y in runs
        ]
    va, vb = verdicts(a), verdicts(b)
    if va or vb:
        lines += ["", "| claim | network | verdict | rerun's verdict |", "|---|---|---|---|"]
        for (claim, net, x), (_, _, y) in zip(va, vb):
            mark = "" if x == y else " (changed)"
            lines.append(f"| {claim} | {net} | {x} | {y}{mark} |")
        if len(va) != len(vb):
            lines.append(f"\nThe tables have {len(va)} and {len(vb)} rows: compared row by row.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", help="results directory, e.g. experiments/results")
    p.add_argument("rerun", help="the rerun's results directory")
    args = p.parse_args(argv)
    for name in ("first", "rerun"):
        if not Path(getattr(args, name)).is_dir():
            p.error(f"{name}={getattr(args, name)!r} is not a directory: give a results directory")
    print(compare(Path(args.first), Path(args.rerun)), end="")


if __name__ == "__main__":
    main()
