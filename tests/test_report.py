"""The README's results table is computed from the result files, seeds included."""

import json

from experiments import report


def _anchor(path, acc, compression=1.0):
    path.write_text(
        json.dumps(
            {
                "test_accuracy": acc,
                "weight_compression": compression,
                "weight_memory_bits": 8 * 1024 * 100,
            }
        )
    )


def test_joint_row_and_seed_spread(tmp_path):
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    for suffix, fp32, joint in (("", 0.90, 0.889), ("_seed1", 0.901, 0.885), ("_seed2", 0.9, 0.87)):
        _anchor(anchors / f"dense_fp32{suffix}.json", fp32)
        _anchor(anchors / f"joint{suffix}.json", joint, compression=56.7)
    _anchor(anchors / "joint_seed3.json", 0.5)  # no FP32 partner: ignored
    table, nums = report.build(tmp_path)
    assert "88.90% (1.10 points below FP32), **56.7X**" in table
    gaps = [round(g, 2) for g in nums["joint_gaps"]]
    assert gaps == [1.1, 1.6, 3.0]
    row = next(line for line in table.splitlines() if "over 3 seeds" in line)
    assert "gap 1.10 to 3.00 points, mean 1.90 | partly |" in row


CURRENT = ("block_compression", "peak_activation_bits")


def _grid(path, names):
    """A 5-design grid CSV, written with the result names ``names`` (old or current)."""
    comp, act = names
    rows = [  # w, a, blocks, accuracy, weight KiB
        (32, 32, 1, 0.900, 1000),
        (2, 32, 1, 0.895, 70),
        (32, 32, 4, 0.893, 260),  # dominated by w2/a32/1x
        (2, 2, 4, 0.880, 20),
        (4, 4, 2, 0.850, 80),  # dominated by w2/a32/1x
    ]
    lines = [f"w_bits,a_bits,{comp},test_accuracy,weight_memory_bits,{act},diverged"]
    for w, a, c, acc, kib in rows:
        lines.append(f"{w},{a},{c},{acc},{kib * 8192},1000,false")
    path.mkdir(parents=True)
    (path / "results.csv").write_text("\n".join(lines) + "\n")


def test_old_and_current_result_names_give_the_same_table(tmp_path):
    tables = []
    for names in (("compression", "activation_memory_bits"), CURRENT):
        root = tmp_path / names[0]
        _grid(root / "grid", names)
        tables.append(report.build(root)[0])
    assert tables[0] == tables[1]
    assert "highest block compression within 1 point: 4X blocks" in tables[1]
    assert "grid's FP32 (90.00%): w2/a32, 89.50%" in tables[1]


def test_study_plot_has_a_title_and_the_grid_front(tmp_path):
    _grid(tmp_path / "grid", CURRENT)
    fig = report.plot_anchors(tmp_path, tmp_path / "study.png")
    assert (tmp_path / "study.png").stat().st_size > 0
    ax = fig.axes[0]
    assert "accuracy vs weight memory" in ax.get_title()
    (front,) = [line for line in ax.get_lines() if line.get_color() == "tab:red"]
    # The staircase through the undominated designs, least memory first.
    assert list(front.get_xdata()) == [20, 70, 1000]
    assert [round(y, 1) for y in front.get_ydata()] == [88.0, 89.5, 90.0]
    assert [t.get_text() for t in ax.texts] == ["w2/a2/4x", "w2/a32/1x", "w32/a32/1x"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Pareto front of the grid (3 designs)" in legend
