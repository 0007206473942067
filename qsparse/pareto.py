"""Pareto frontier extraction and reports (numpy + matplotlib only).

Dominance: with every objective turned into "larger is better", row ``a`` dominates row ``b``
when ``a >= b`` in every column and ``a > b`` in at least one. Consequences:

* exact duplicates (equal in every column) do not dominate each other, so every copy of a
  non-dominated point is on the front;
* a point that is equal in one column and worse in another is dominated (weakly worse is
  still worse);
* a row with NaN in any objective is never on the front and never dominates another row.

``pareto_front`` returns front indices in a stable, documented order (see its docstring);
``plot_front`` builds a ``matplotlib.figure.Figure`` without touching pyplot's global state
(no backend switch, safe in notebooks); ``front_table`` renders a Markdown table.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["pareto_mask", "pareto_front", "plot_front", "front_table", "default_label"]

# Elements of one (chunk, N, D) comparison block; bounds memory of pareto_mask.
_CHUNK_ELEMENTS = 1 << 22
_DIRECTIONS = ("max", "min")


def pareto_mask(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Non-dominated rows of a point set.

    Row ``a`` dominates row ``b`` if it is at least as good in every column and strictly
    better in at least one. Exact duplicates (ties in every column) do not dominate each
    other: all copies of a non-dominated point are kept. Rows holding a NaN are never on
    the front and never dominate; infinities compare as usual. Rows are visited in
    descending lexicographic order and compared, in vectorised chunks of bounded memory,
    with the front found so far: O(N F D) time for a front of F rows (at worst O(N^2 D)),
    fine for N up to ~10^4.

    Args:
      points: array-like of shape ``(N, D)``, ``D >= 1``, converted to float.
      maximize: ``D`` bools; ``True`` if larger is better in that column, ``False`` if
        smaller is better.

    Returns:
      Bool array of shape ``(N,)``, ``True`` for the non-dominated rows.

    Raises:
      ValueError: ``points`` is not 2-D, has no columns, or ``maximize`` has the wrong length.
      TypeError: an entry of ``maximize`` is not a bool (guards against ``"min"`` being truthy).
    """
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2:
        raise ValueError(f"points must be 2-D (N, D), got shape {pts.shape}")
    n, d = pts.shape
    if d == 0:
        raise ValueError("points must have at least one column")
    flags = list(maximize)
    if len(flags) != d:
        raise ValueError(f"maximize has {len(flags)} entries, points have {d} columns")
    for f in flags:
        if not isinstance(f, (bool, np.bool_)):
            raise TypeError(f"maximize entries must be bools, got {f!r}")
    sign = np.where(np.asarray(flags, dtype=bool), 1.0, -1.0)

    valid = ~np.isnan(pts).any(axis=1)
    mask = valid.copy()
    cand = pts[valid] * sign  # larger is better in every column
    m = cand.shape[0]
    if m == 0:
        return mask
    # A dominator is strictly greater lexicographically, so it comes first in a descending
    # lexicographic order; by transitivity, a dominated row is dominated by a front row. So
    # each chunk (in that order) is compared only with the front found so far and itself.
    order = np.lexsort(tuple(-cand[:, k] for k in range(d - 1, -1, -1)))
    cand = cand[order]
    dominated = np.zeros(m, dtype=bool)
    front = np.zeros(0, dtype=np.intp)  # positions (in sorted order) of front rows so far
    start = 0
    while start < m:
        f = front.size
        # largest chunk c with c * (f + c) * d <= _CHUNK_ELEMENTS
        c = int((math.sqrt(f * f + 4 * _CHUNK_ELEMENTS / d) - f) / 2)
        stop = min(m, start + max(1, c))
        rows = cand[start:stop]
        others = np.concatenate([cand[front], rows])
        at_least = np.ones((rows.shape[0], others.shape[0]), dtype=bool)
        better = np.zeros_like(at_least)
        for k in range(d):  # column loop: 2-D ops, no reduction over a short axis
            col, ref = others[None, :, k], rows[:, None, k]
            at_least &= col >= ref
            better |= col > ref
        dom = (at_least & better).any(axis=1)
        dominated[start:stop] = dom
        front = np.concatenate([front, np.arange(start, stop)[~dom]])
        start = stop
    in_rows = np.empty(m, dtype=bool)
    in_rows[order] = dominated  # back to the input order
    mask[np.flatnonzero(valid)[in_rows]] = False
    return mask


def _to_float(value, i: int, name: str) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"row {i}: column {name!r} is not numeric: {value!r}") from None


def _column(rows: Sequence[Mapping], name: str) -> np.ndarray:
    """Float column ``name`` of ``rows`` (``None`` -> NaN); ValueError if a row lacks it."""
    out = np.empty(len(rows), dtype=float)
    for i, row in enumerate(rows):
        if name not in row:
            raise ValueError(f"row {i} has no column {name!r}")
        out[i] = _to_float(row[name], i, name)
    return out


def pareto_front(rows: Sequence[Mapping], objectives: Mapping[str, str]) -> list[int]:
    """Indices of the Pareto-optimal rows of a result table.

    Dominance and tie handling are those of :func:`pareto_mask`; a ``None`` or NaN value in
    any objective keeps a row off the front.

    Order: ascending by the *sort column*, which is the first ``"min"`` objective in
    ``objectives``' iteration order (e.g. memory), or the first objective if all are
    ``"max"``; ties (including duplicates) by original row index. For two objectives this
    walks the front monotonically along both axes.

    Args:
      rows: sequence of mappings (e.g. dicts from a sweep), one per design.
      objectives: column name -> ``"max"`` or ``"min"``, e.g.
        ``{"weight_bits": "min", "accuracy": "max"}``.

    Returns:
      List of int indices into ``rows``.

    Raises:
      ValueError: ``objectives`` is empty, a direction is not ``"max"``/``"min"``, a row
        lacks an objective column, or a value is not numeric.
    """
    if not objectives:
        raise ValueError("objectives must name at least one column")
    names = list(objectives)
    for name in names:
        direction = objectives[name]
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"objective {name!r}: direction must be 'max' or 'min', got {direction!r}"
            )
    if len(rows) == 0:
        return []
    points = np.stack([_column(rows, name) for name in names], axis=1)
    maximize = [objectives[name] == "max" for name in names]
    idx = np.flatnonzero(pareto_mask(points, maximize))
    mins = [j for j, name in enumerate(names) if objectives[name] == "min"]
    key = points[idx, mins[0] if mins else 0]
    order = np.lexsort((idx, key))
    return [int(i) for i in idx[order]]


def _fmt_number(v, float_fmt: str = ".3g") -> str:
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        f = float(v)
        if f.is_integer() and abs(f) < 1e15:
            return str(int(f))
        return format(f, float_fmt)
    return str(v)


def default_label(row: Mapping) -> str:
    """Default point label ``"w{w_bits}/a{a_bits}/{compression}x"``.

    Parts whose key is missing (or ``None``) are left out; a row with none of the keys gets
    an empty label.

    Args:
      row: a result mapping.

    Returns:
      The label string.
    """
    parts = []
    for key, fmt in (("w_bits", "w{}"), ("a_bits", "a{}"), ("compression", "{}x")):
        if row.get(key) is not None:
            parts.append(fmt.format(_fmt_number(row[key])))
    return "/".join(parts)


def plot_front(
    rows: Sequence[Mapping],
    x: str,
    y: str,
    front: Sequence[int],
    *,
    label_fn: Callable[[Mapping], str] | None = None,
    title: str | None = None,
    logx: bool = True,
    where: str = "post",
    yerr: str | None = None,
):
    """Scatter all designs and highlight the Pareto front.

    All points are grey; front points are drawn on top, joined by a step line in ``x``
    order, and annotated with ``label_fn(row)``. The figure is a bare
    ``matplotlib.figure.Figure`` (no pyplot state, no backend change): save it with
    ``fig.savefig(path)``. Rows with NaN/``None`` in ``x`` or ``y`` are not drawn.

    Args:
      rows: sequence of mappings, one per design.
      x: column for the horizontal axis (e.g. memory).
      y: column for the vertical axis (e.g. accuracy).
      front: indices into ``rows`` of the front (e.g. from :func:`pareto_front`).
      label_fn: row -> annotation text; default :func:`default_label`
        (``"w{w_bits}/a{a_bits}/{compression}x"`` from the keys present).
      title: axes title, if any.
      logx: log-scale ``x``; ignored (linear axis) if any drawn ``x`` is ``<= 0``.
      where: step placement passed to ``Axes.step``; ``"post"`` draws the attainment
        staircase of a min-``x`` / max-``y`` front (memory vs accuracy), ``"pre"`` that of
        a max/max or min/min front.
      yerr: column of each ``y``'s error (e.g. a standard deviation over seeds), drawn as
        error bars; ``None``: none. NaN errors draw no bar.

    Returns:
      The ``matplotlib.figure.Figure``.

    Raises:
      ValueError: a row lacks ``x`` or ``y``, or a value is not numeric.
      IndexError: an index in ``front`` is out of range.
    """
    from matplotlib.figure import Figure

    label_fn = default_label if label_fn is None else label_fn
    xs, ys = _column(rows, x), _column(rows, y)
    front = _front_indices(front, len(rows))

    fig = Figure(figsize=(7.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ok = np.isfinite(xs) & np.isfinite(ys)
    ax.scatter(xs[ok], ys[ok], s=18, color="0.7", label=f"all designs ({int(ok.sum())})", zorder=1)
    shown = [i for i in front if ok[i]]
    shown.sort(key=lambda i: (xs[i], ys[i], i))
    if yerr is not None:
        err = np.nan_to_num(_column(rows, yerr), nan=0.0)
        on = np.zeros(len(rows), bool)
        on[shown] = True
        for sel, color in ((ok & ~on, "0.7"), (on, "tab:red")):
            ax.errorbar(xs[sel], ys[sel], yerr=err[sel], fmt="none", ecolor=color, lw=0.8)
    if shown:
        fx, fy = xs[shown], ys[shown]
        _draw_front(ax, fx, fy, where)
        _annotate(ax, [label_fn(rows[i]) for i in shown], fx, fy)
    if logx and ok.any() and (xs[ok] > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def _front_indices(front: Sequence[int], n: int) -> list[int]:
    """``front`` as ints; IndexError for one out of range for ``n`` rows."""
    front = [int(i) for i in front]
    for i in front:
        if not 0 <= i < n:
            raise IndexError(f"front index {i} out of range for {n} rows")
    return front


def _draw_front(ax, fx: np.ndarray, fy: np.ndarray, where: str) -> None:
    """The front's staircase and its points, over the grey designs."""
    ax.step(fx, fy, where=where, color="tab:red", lw=1.2, zorder=2)
    ax.scatter(
        fx,
        fy,
        s=36,
        color="tab:red",
        edgecolor="black",
        lw=0.5,
        zorder=3,
        label=f"Pareto front ({len(fx)})",
    )


def _annotate(ax, labels: Sequence, fx: np.ndarray, fy: np.ndarray) -> None:
    """Writes each non-empty label next to its point."""
    for text, px, py in zip(labels, fx, fy):
        if text:
            ax.annotate(
                str(text),
                (px, py),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize=7,
                zorder=4,
            )


def _cell(value, float_fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_):
        if isinstance(value, numbers.Integral):
            return str(int(value))
        return format(float(value), float_fmt)
    text = str(value).replace("\r", " ").replace("\n", " ")
    return text.replace("|", "\\|")


def front_table(
    rows: Sequence[Mapping],
    front: Sequence[int],
    columns: Sequence[str],
    *,
    float_fmt: str = ".4g",
) -> str:
    """Markdown table of the front rows, one line per index in ``front`` (order kept).

    Integers are written exactly, other reals with ``float_fmt``; a missing key or ``None``
    gives an empty cell; ``|`` in text is escaped and newlines become spaces. Columns whose
    present values are all numbers are right-aligned.

    Args:
      rows: sequence of mappings, one per design.
      front: indices into ``rows`` (e.g. from :func:`pareto_front`).
      columns: column names, in table order.
      float_fmt: format spec for non-integer reals.

    Returns:
      The table as a string (header, separator, one line per front row; no trailing newline).

    Raises:
      ValueError: ``columns`` is empty.
      IndexError: an index in ``front`` is out of range.
    """
    columns = list(columns)
    if not columns:
        raise ValueError("columns must name at least one column")
    picked = []
    for i in front:
        i = int(i)
        if not 0 <= i < len(rows):
            raise IndexError(f"front index {i} out of range for {len(rows)} rows")
        picked.append(rows[i])

    def numeric(col):
        vals = [r[col] for r in picked if r.get(col) is not None]
        return bool(vals) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) for v in vals
        )

    header = "| " + " | ".join(_cell(c, float_fmt) for c in columns) + " |"
    sep = "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"
    lines = [header, sep]
    for r in picked:
        lines.append("| " + " | ".join(_cell(r.get(c), float_fmt) for c in columns) + " |")
    return "\n".join(lines)
