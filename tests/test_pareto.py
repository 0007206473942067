"""Tests for qsparse.pareto: dominance, front order, plotting and Markdown report."""

import math

import numpy as np
import pytest

from qsparse.pareto import default_label, front_table, pareto_front, pareto_mask, plot_front


def naive_mask(points, maximize):
    """Reference double loop, straight from the definition."""
    pts = np.asarray(points, dtype=float) * np.where(maximize, 1.0, -1.0)
    n = len(pts)
    keep = []
    for i in range(n):
        if np.isnan(pts[i]).any():
            keep.append(False)
            continue
        dominated = False
        for j in range(n):
            if j == i or np.isnan(pts[j]).any():
                continue
            if all(pts[j] >= pts[i]) and any(pts[j] > pts[i]):
                dominated = True
                break
        keep.append(not dominated)
    return np.array(keep, dtype=bool)


# --- pareto_mask ---------------------------------------------------------------------------


def test_mask_2d_mixed_min_max():
    # columns: memory (min), accuracy (max)
    pts = [
        [10, 0.90],  # 0 front: cheapest
        [20, 0.95],  # 1 front
        [25, 0.93],  # 2 dominated by 1
        [40, 0.97],  # 3 front
        [50, 0.96],  # 4 dominated by 3
        [15, 0.85],  # 5 dominated by 0
    ]
    mask = pareto_mask(np.array(pts), [False, True])
    assert mask.dtype == bool
    assert mask.tolist() == [True, True, False, True, False, False]


def test_mask_2d_direction_matters():
    pts = np.array([[1.0, 1.0], [2.0, 2.0]])
    assert pareto_mask(pts, [True, True]).tolist() == [False, True]
    assert pareto_mask(pts, [False, False]).tolist() == [True, False]
    assert pareto_mask(pts, [True, False]).tolist() == [True, True]


def test_mask_3d():
    # all maximised
    pts = np.array(
        [
            [1, 0, 0],  # 0 dominated by 4
            [0, 1, 0],  # 1 dominated by 4
            [0, 0, 1],  # 2 front among rows 0..4 (only one with col 2 > 0)
            [0, 0, 0],  # 3 dominated by every other row
            [1, 1, 0],  # 4 dominates 0, 1 and 3
            [1, 1, 1],  # 5 dominates everything
        ]
    )
    assert pareto_mask(pts, [True] * 3).tolist() == [False, False, False, False, False, True]
    assert pareto_mask(pts[:5], [True] * 3).tolist() == [False, False, True, False, True]
    # mixed: minimise the third column
    mixed = [False, False, False, False, True, False]
    assert pareto_mask(pts, [True, True, False]).tolist() == mixed


def test_mask_duplicates_all_kept():
    pts = np.array([[1.0, 5.0], [1.0, 5.0], [2.0, 6.0], [2.0, 6.0], [0.5, 1.0]])
    mask = pareto_mask(pts, [False, True])
    # both copies of (1,5) and of (2,6) are on the front; (0.5,1) too (cheapest)
    assert mask.tolist() == [True, True, True, True, True]
    # duplicates of a dominated point are all dropped
    pts = np.array([[1.0, 5.0], [3.0, 4.0], [3.0, 4.0]])
    assert pareto_mask(pts, [False, True]).tolist() == [True, False, False]


def test_mask_weakly_dominated_excluded():
    # (10, 0.9) vs (10, 0.8): equal memory, worse accuracy -> excluded
    # (20, 0.9): equal accuracy, worse memory -> excluded
    pts = np.array([[10.0, 0.9], [10.0, 0.8], [20.0, 0.9]])
    assert pareto_mask(pts, [False, True]).tolist() == [True, False, False]


def test_mask_single_point_and_empty():
    assert pareto_mask(np.array([[3.0, 4.0]]), [True, False]).tolist() == [True]
    assert pareto_mask(np.zeros((0, 2)), [True, False]).tolist() == []
    one_col = np.array([[1.0], [3.0], [3.0], [2.0]])
    assert pareto_mask(one_col, [True]).tolist() == [False, True, True, False]


def test_mask_all_on_front():
    x = np.arange(10.0)
    pts = np.stack([x, -x], axis=1)  # trade-off line, both maximised
    assert pareto_mask(pts, [True, True]).all()


def test_mask_nan_rows():
    pts = np.array(
        [
            [np.nan, 100.0],  # 0 would dominate everything without the NaN
            [1.0, 1.0],  # 1 front
            [0.0, 0.0],  # 2 dominated by 1
            [5.0, np.nan],  # 3 NaN: off
            [np.nan, np.nan],  # 4 NaN: off
        ]
    )
    assert pareto_mask(pts, [True, True]).tolist() == [False, True, False, False, False]
    assert not pareto_mask(np.full((3, 2), np.nan), [True, True]).any()


def test_mask_infinities():
    pts = np.array([[np.inf, 0.0], [1.0, 1.0], [-np.inf, 2.0]])
    assert pareto_mask(pts, [True, True]).tolist() == [True, True, True]
    assert pareto_mask(pts, [False, True]).tolist() == [False, False, True]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_matches_naive_random_ints(seed):
    rng = np.random.default_rng(seed)
    pts = rng.integers(0, 6, size=(200, 3)).astype(float)  # many ties and duplicates
    pts[rng.choice(200, size=8, replace=False), rng.integers(0, 3, size=8)] = np.nan
    maximize = [bool(b) for b in rng.integers(0, 2, size=3)]
    got = pareto_mask(pts, maximize)
    np.testing.assert_array_equal(got, naive_mask(pts, maximize))
    assert got.any()


def test_mask_chunking_matches_naive(monkeypatch):
    import qsparse.pareto as pareto

    monkeypatch.setattr(pareto, "_CHUNK_ELEMENTS", 50)  # many tiny chunks
    rng = np.random.default_rng(7)
    pts = rng.integers(0, 8, size=(200, 2))
    np.testing.assert_array_equal(pareto_mask(pts, [False, True]), naive_mask(pts, [False, True]))


def test_mask_large_sets_with_small_chunks(monkeypatch):
    import qsparse.pareto as pareto

    monkeypatch.setattr(pareto, "_CHUNK_ELEMENTS", 5000)
    rng = np.random.default_rng(3)
    x = rng.permutation(3000).astype(float)
    line = np.stack([x, -x], axis=1)  # an anti-chain: everything on the front
    assert pareto_mask(line, [True, True]).all()
    pts = np.concatenate([line, line[:100] - 1.0])  # shifted copies: all dominated
    mask = pareto_mask(pts, [True, True])
    assert mask[:3000].all() and not mask[3000:].any()


def test_mask_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        pareto_mask(np.zeros(3), [True])
    with pytest.raises(ValueError, match="entries"):
        pareto_mask(np.zeros((3, 2)), [True])
    with pytest.raises(ValueError, match="column"):
        pareto_mask(np.zeros((3, 0)), [])
    with pytest.raises(TypeError, match="bools"):
        pareto_mask(np.zeros((3, 2)), ["max", "min"])


# --- pareto_front -----------------------------------------------------------------------------


def _rows():
    return [
        {"mem": 40, "acc": 0.97, "w_bits": 8, "a_bits": 8, "compression": 2},  # 0 front
        {"mem": 10, "acc": 0.90, "w_bits": 2, "a_bits": 2, "compression": 8},  # 1 front
        {"mem": 25, "acc": 0.93, "w_bits": 4, "a_bits": 4, "compression": 4},  # 2 dominated
        {"mem": 20, "acc": 0.95, "w_bits": 2, "a_bits": 4, "compression": 4},  # 3 front
        {"mem": 50, "acc": 0.96, "w_bits": 32, "a_bits": 32, "compression": 1},  # 4 dominated
        {"mem": 20, "acc": 0.95, "w_bits": 2, "a_bits": 4, "compression": 4},  # 5 dup of 3
    ]


def test_front_stable_order_by_first_min_column():
    # sorted by mem ascending; the duplicate (3, 5) tie is broken by index
    assert pareto_front(_rows(), {"acc": "max", "mem": "min"}) == [1, 3, 5, 0]
    assert pareto_front(_rows(), {"mem": "min", "acc": "max"}) == [1, 3, 5, 0]


def test_front_order_all_max_uses_first_objective():
    rows = [{"a": 3, "b": 1}, {"a": 1, "b": 3}, {"a": 2, "b": 2}, {"a": 1, "b": 1}]
    assert pareto_front(rows, {"a": "max", "b": "max"}) == [1, 2, 0]
    assert pareto_front(rows, {"b": "max", "a": "max"}) == [0, 2, 1]


def test_front_returns_python_ints_and_handles_empty():
    front = pareto_front(_rows(), {"mem": "min", "acc": "max"})
    assert all(type(i) is int for i in front)
    assert pareto_front([], {"mem": "min"}) == []
    assert pareto_front([{"mem": 3}], {"mem": "min"}) == [0]


def test_front_none_and_nan_values_excluded():
    rows = [{"m": 1, "a": None}, {"m": 2, "a": 0.5}, {"m": float("nan"), "a": 0.9}]
    assert pareto_front(rows, {"m": "min", "a": "max"}) == [1]


def test_front_3d_objectives():
    rows = [
        {"w": 10, "act": 5, "acc": 0.9},
        {"w": 10, "act": 6, "acc": 0.9},  # dominated by 0
        {"w": 5, "act": 9, "acc": 0.9},  # front (least weight memory)
        {"w": 12, "act": 4, "acc": 0.95},  # front
    ]
    assert pareto_front(rows, {"w": "min", "act": "min", "acc": "max"}) == [2, 0, 3]


@pytest.mark.parametrize("bad", ["maximize", "MAX", None, 1, "asc"])
def test_front_bad_objective_value(bad):
    with pytest.raises(ValueError, match="direction") as err:
        pareto_front(_rows(), {"mem": "min", "acc": bad})
    assert repr(bad) in str(err.value) and "acc" in str(err.value)


def test_front_missing_column_and_bad_values():
    with pytest.raises(ValueError, match="no column 'latency'"):
        pareto_front(_rows(), {"latency": "min"})
    with pytest.raises(ValueError, match="at least one"):
        pareto_front(_rows(), {})
    with pytest.raises(ValueError, match="not numeric"):
        pareto_front([{"m": "abc"}], {"m": "min"})


# --- plot_front / labels ----------------------------------------------------------------------


def test_plot_front_saves_png(tmp_path):
    rows = _rows()
    front = pareto_front(rows, {"mem": "min", "acc": "max"})
    fig = plot_front(rows, "mem", "acc", front, title="memory vs accuracy")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_title() == "memory vs accuracy"
    texts = [t.get_text() for t in ax.texts]
    assert "w2/a2/8x" in texts and "w8/a8/2x" in texts and len(texts) == len(front)
    path = tmp_path / "front.png"
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_front_custom_labels_linear_and_nan(tmp_path):
    rows = _rows() + [{"mem": float("nan"), "acc": 0.99}, {"mem": 0, "acc": 0.1}]
    front = [1, 3, 0]
    fig = plot_front(rows, "mem", "acc", front, label_fn=lambda r: f"m={r['mem']}")
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear"  # a zero x forbids the log axis
    assert sorted(t.get_text() for t in ax.texts) == ["m=10", "m=20", "m=40"]
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    fig = plot_front(rows[:6], "mem", "acc", [], logx=False)
    assert fig.axes[0].get_xscale() == "linear" and not fig.axes[0].texts


def test_plot_front_error_bars_span_each_design_std():
    rows = [{**r, "std": 0.01 * (i + 1)} for i, r in enumerate(_rows()[:5])]  # distinct mem
    front = pareto_front(rows, {"mem": "min", "acc": "max"})
    ax = plot_front(rows, "mem", "acc", front, yerr="std").axes[0]
    spans = {}
    for container in ax.containers:  # one for the other designs, one for the front
        for seg in container.lines[2][0].get_segments():
            (x, lo), (_, hi) = seg
            spans[x] = ((lo + hi) / 2, (hi - lo) / 2)
    assert len(spans) == len(rows)
    for r in rows:
        mid, half = spans[r["mem"]]
        assert mid == pytest.approx(r["acc"]) and half == pytest.approx(r["std"])


def test_plot_front_errors():
    with pytest.raises(ValueError, match="no column"):
        plot_front(_rows(), "latency", "acc", [0])
    with pytest.raises(IndexError):
        plot_front(_rows(), "mem", "acc", [99])


def test_default_label():
    assert default_label({"w_bits": 2, "a_bits": 2, "compression": 4.0}) == "w2/a2/4x"
    assert default_label({"w_bits": 3, "compression": 49.73}) == "w3/49.7x"
    assert default_label({"acc": 0.5}) == ""


# --- front_table ------------------------------------------------------------------------------


def test_front_table_markdown():
    rows = _rows()
    rows[0]["name"] = "a|b\nc"
    table = front_table(rows, [1, 0], ["name", "w_bits", "acc", "mem"])
    lines = table.split("\n")
    assert lines[0] == "| name | w_bits | acc | mem |"
    assert lines[1] == "|---|---:|---:|---:|"
    assert lines[2] == "|  | 2 | 0.9 | 10 |"
    assert lines[3] == "| a\\|b c | 8 | 0.97 | 40 |"
    assert len(lines) == 4 and not table.endswith("\n")


def test_front_table_formats_and_errors():
    rows = [{"x": math.pi, "y": np.int64(7), "z": None, "f": np.float32(0.5)}]
    table = front_table(rows, [0], ["x", "y", "z", "f"], float_fmt=".3f")
    assert table.split("\n")[2] == "| 3.142 | 7 |  | 0.500 |"
    assert front_table(rows, [], ["x"]) == "| x |\n|---|"
    with pytest.raises(ValueError):
        front_table(rows, [0], [])
    with pytest.raises(IndexError):
        front_table(rows, [3], ["x"])
