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


def test_joint_row_mean_std_over_seeds_and_its_verdict(tmp_path):
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    for suffix, fp32, joint in (("", 0.90, 0.889), ("_seed1", 0.901, 0.885), ("_seed2", 0.9, 0.87)):
        _anchor(anchors / f"dense_fp32{suffix}.json", fp32)
        _anchor(anchors / f"joint{suffix}.json", joint, compression=56.7)
    _anchor(anchors / "joint_seed3.json", 0.5)  # no FP32 partner: ignored
    table, nums = report.build(tmp_path)
    assert [round(g, 2) for g in nums["joint_gaps"]] == [1.1, 1.6, 3.0]
    row = next(line for line in table.splitlines() if "| joint 2-bit" in line)
    # Gap 1.90 ± 0.98 points: the 1.5-point threshold is within two standard errors (0.57).
    assert "88.13% ± 1.00, 1.90 points ± 0.98 below FP32 (seeds 1.10, 1.60, 3.00)" in row
    assert "**56.7X**" in row and row.endswith("| not decided at this noise |")
    assert report.RULE in table


def test_verdict_rule():
    assert report.verdict(0.5, 0.2) == "agrees"
    assert report.verdict(-0.5, 0.2) == "differs"
    assert report.verdict(0.3, 0.2) == "not decided at this noise"
    assert report.verdict(-0.3, 0.2) == "not decided at this noise"
    assert report.verdict(0.3, float("nan")) == "agrees (one seed)"
    assert report.verdict(-0.3, float("nan")) == "differs (one seed)"


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
    head = f"w_bits,a_bits,{comp},test_accuracy,weight_memory_bits,{act},total_memory_bits"
    lines = [head + ",diverged"]
    for w, a, c, acc, kib in rows:
        lines.append(f"{w},{a},{c},{acc},{kib * 8192},1000,{kib * 8192 + 1000},false")
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
    assert "Pareto front of the grid's means (3 designs)" in legend


def _seeded(root):
    """A grid and a shape sweep over seeds 0-2 (results.csv as the sweeps write them)."""
    cols = "model,seed,w_bits,a_bits,block_compression,test_accuracy,weight_memory_bits"
    cols += ",peak_activation_bits,total_memory_bits,diverged"
    grid = [  # w, a, blocks, accuracy per seed, weight bits
        (32, 32, 1, (0.900, 0.902, 0.898), 8000),
        (2, 32, 1, (0.897, 0.899, 0.896), 600),
        (2, 2, 4, (0.880, 0.850, 0.881), 150),  # on the front in seeds 0 and 2 only
        (1, 2, 16, (0.860, 0.860, 0.860), 40),
        (4, 4, 8, (0.870, 0.870, 0.870), 160),  # seed 1: the front's 8X design
    ]
    lines = [cols]
    for w, a, c, accs, bits in grid:
        act = 100 if c <= 2 else 60
        for seed, acc in enumerate(accs):
            lines.append(f"m,{seed},{w},{a},{c},{acc},{bits},{act},{bits + act},false")
    (root / "grid").mkdir(parents=True)
    (root / "grid" / "results.csv").write_text("\n".join(lines) + "\n")
    shapes = [cols]
    for seed, (deep, shallow) in enumerate(((0.89, 0.88), (0.895, 0.884), (0.888, 0.879))):
        for model, acc in (("deep-sparse", deep), ("shallow-dense", shallow)):
            shapes.append(f"{model},{seed},2,2,4,{acc},100,10,110,false")
            shapes.append(f"{model},{seed},32,32,4,{acc - 0.01 * seed},100,10,110,false")
    (root / "shapes").mkdir()
    (root / "shapes" / "results.csv").write_text("\n".join(shapes) + "\n")
    cnn = [cols]  # the CNNs: shallow-dense ahead of deep-sparse by a point in every seed
    for seed, deep in enumerate((0.87, 0.872, 0.869)):
        for model, acc in (("deep-sparse", deep), ("shallow-dense", deep + 0.01)):
            cnn.append(f"{model},{seed},2,2,4,{acc},100,10,110,false")
    (root / "cnn_shapes").mkdir()
    (root / "cnn_shapes" / "results.csv").write_text("\n".join(cnn) + "\n")


def test_seeded_grid_and_shapes_rows_carry_their_verdicts(tmp_path):
    _seeded(tmp_path)
    table, _ = report.build(tmp_path)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    rows = {line.split(" | ")[0][2:]: line for line in lines}
    optimal = rows["2/2/4X is the optimal joint design"]
    assert "front in 2 of 3 seeds (87.03% ± 1.76" in optimal
    assert optimal.endswith("| not decided at this noise |")
    quant = next(v for k, v in rows.items() if k.startswith("quantization only"))
    # w2/a32 is 0.27 points below FP32 in every seed: within 1 point, far beyond two errors.
    assert "w2/a32, 89.73% ± 0.15, **13.3X**" in quant and quant.endswith("| agrees |")
    deep = [line for line in lines if line.startswith("| deep-sparse")]
    assert deep[0].endswith("| agrees |")  # w2/a2: deep ahead by 1.0 ± 0.1 points
    assert "w2/a2" in deep[0] and "deep-sparse 89.10% ± 0.36" in deep[0]
    # w32/a32: deep ahead by 1.0 points in every seed, but the seeds move both by 1 point.
    assert "deep-sparse 88.10% ± 1.15" in deep[1] and deep[1].endswith("| agrees |")
    # The CNNs' row is their own (w2/a2 only here), with the opposite verdict.
    assert len(deep) == 3 and "| CNNs" in deep[2] and "| MLPs" in deep[0]
    assert "shallow-dense 88.03% ± 0.15" in deep[2] and deep[2].endswith("| differs |")
    act = next(v for k, v in rows.items() if k.startswith("activation memory"))
    assert act.endswith("| agrees |") and "per seed: 8% vs 60%; 8% vs 44%; 8% vs 60%" in act


def test_levers_are_reported_over_their_seeds_against_the_same_seeds(tmp_path):
    anchors, levers = tmp_path / "anchors", tmp_path / "levers"
    (levers / "seeds").mkdir(parents=True)
    anchors.mkdir()
    for seed, fp32, joint, lever in (
        (0, 0.90, 0.89, 0.892),
        (1, 0.91, 0.895, 0.899),
        (2, 0.9, 0.88, 0.883),
    ):
        suffix = f"_seed{seed}" if seed else ""
        _anchor(anchors / f"dense_fp32{suffix}.json", fp32)
        _anchor(anchors / f"joint{suffix}.json", joint, compression=56.6)
        _anchor((levers / "seeds" if seed else levers) / f"bias8{suffix}.json", lever, 60.6)
    _anchor(levers / "no_prox.json", 0.885, 56.6)  # seed 0 only
    table, _ = report.build(tmp_path)
    bias8 = next(line for line in table.splitlines() if "quant.bias_bits=8" in line)
    # +0.30 points on every seed; FP32 gaps 0.8, 1.1, 1.7.
    assert "| 0, 1, 2 | 89.13% ± 0.80 | +0.30 points | 1.20 points ± 0.46 | 60.6X |" in bias8
    no_prox = next(line for line in table.splitlines() if "block lasso" in line)
    assert "| 0 | 88.50% | -0.50 points | 1.50 points | 56.6X |" in no_prox
    target = next(line for line in table.splitlines() if "this study's target" in line)
    assert "1.20 points ± 0.46 below FP32 (seeds 0.80, 1.10, 1.70), **60.6X**" in target
    assert target.endswith("| not decided at this noise |")  # 1.0 - 1.2 is within 2 x 0.26


def test_resnet_rows_say_what_the_cnn_reached(tmp_path):
    res = tmp_path / "resnet"
    res.mkdir()
    best = "w2a2_4x_ste_midrise_columns_wd03"
    for seed, fp32, acc in ((0, 0.92, 0.915), (1, 0.93, 0.915), (2, 0.91, 0.90)):
        suffix = f"_seed{seed}" if seed else ""
        _anchor(res / f"fp32{suffix}.json", fp32)
        _anchor(res / f"{best}{suffix}.json", acc, compression=52.0)
    _anchor(res / "w2a2_4x.json", 0.83, compression=26.6)  # seed 0 only
    _anchor(res / "w2a2_4x_ste.json", 0.86, compression=26.6)  # not a row
    rows = [line for line in report.build(tmp_path)[0].splitlines() if "ResNet-8" in line]
    assert len(rows) == 2
    assert "83.00%, 9.00 points below FP32 (92.00%; seed 0), **26.6X**" in rows[0]
    assert rows[0].endswith("| differs |")  # below 50X whatever the accuracy
    # Gaps paired by seed: 0.5, 1.5, 1.0 points.
    assert "weight decay 0.3 | 91.00% ± 0.87, 1.00 points ± 0.50 below FP32" in rows[1]
    assert "(92.00% ± 1.00; seeds 0-2), **52.0X**" in rows[1]
    assert rows[1].endswith("| not decided at this noise |")  # 1.5 - 1.0 is within 2 x 0.29
    # The re-estimated recipe replaces it, paired by seed with the FP32 runs.
    for seed, acc in ((0, 0.915), (1, 0.92)):
        suffix = f"_seed{seed}" if seed else ""
        _anchor(res / f"w2a2_4x_recal{suffix}.json", acc, compression=52.0)
    rows = [line for line in report.build(tmp_path)[0].splitlines() if "ResNet-8" in line]
    assert len(rows) == 2 and "from scratch" in rows[0]
    assert "batch statistics re-estimated | 91.75% ± 0.35, 0.75 points ± 0.35 below" in rows[1]
    assert "(92.50% ± 0.71; seeds 0-1), **52.0X**" in rows[1]
    # Then weight decay 0.6 on it replaces that.
    _anchor(res / "w2a2_4x_recal_wd06_seed2.json", 0.905, compression=52.0)
    rows = [line for line in report.build(tmp_path)[0].splitlines() if "ResNet-8" in line]
    assert len(rows) == 2 and "weight decay 0.6, batch statistics re-estimated | 90.50%" in rows[1]
    assert "0.50 points below FP32 (91.00%; seed 2)" in rows[1]


def test_the_readme_points_to_the_levers_instead_of_listing_them(tmp_path):
    (tmp_path / "anchors").mkdir()
    (tmp_path / "levers").mkdir()
    _anchor(tmp_path / "anchors" / "dense_fp32.json", 0.9)
    _anchor(tmp_path / "anchors" / "joint.json", 0.89, 56.6)
    _anchor(tmp_path / "levers" / "no_prox.json", 0.885, 56.6)
    full, _ = report.build(tmp_path)
    short, _ = report.build(tmp_path, levers_table=False)
    assert "block lasso" in full and "block lasso" not in short
    assert short.rstrip().endswith(
        " The levers tried on the joint setting (1), each over its seeds: "
        "[experiments/results/summary.md](experiments/results/summary.md)."
    )


def test_the_cnn_grid_gets_the_grid_claims_under_its_own_name(tmp_path):
    _seeded(tmp_path)
    (tmp_path / "cnn_grid").mkdir()
    (tmp_path / "cnn_grid" / "results.csv").write_text(
        (tmp_path / "grid" / "results.csv").read_text()
    )
    table, _ = report.build(tmp_path)
    cnn = [line for line in table.splitlines() if report.CNN_GRID in line]
    assert [line.split(" | ")[0] for line in cnn] == [
        "| joint 2-bit W / 2-bit A / 4X blocks on every layer: about 50X at accuracy close to FP32",
        "| quantization only: about 16X (here: 12X or more within 1 point of FP32)",
        "| sparsity only: about 2X (here: 1.5X or more within 1 point of FP32)",
        "| 2/2/4X is the optimal joint design",
    ]
    # Gaps 2.0, 5.2, 1.7 points: mean 2.97 ± 1.94, 1.5 is within two standard errors.
    assert "2.97 points below, **53.3X** | not decided at this noise |" in cnn[0]


def test_a_four_design_cnn_grid_says_what_it_cannot_decide(tmp_path):
    cols = "model,seed,w_bits,a_bits,block_compression,test_accuracy,weight_memory_bits"
    cols += ",peak_activation_bits,total_memory_bits,diverged"
    lines = [cols]
    for w, a, c, accs, bits in (  # FP32, quantization only, sparsity only, joint
        (32, 32, 1, (0.905, 0.908, 0.904), 8000),
        (2, 2, 1, (0.886, 0.887, 0.883), 500),  # 1.9, 2.1, 2.1 points below FP32
        (32, 32, 4, (0.88, 0.89, 0.885), 2100),
        (2, 2, 4, (0.87, 0.87, 0.862), 135),  # the least memory: on every seed's front
    ):
        for seed, acc in enumerate(accs):
            lines.append(f"m,{seed},{w},{a},{c},{acc},{bits},10,{bits + 10},false")
    (tmp_path / "cnn_grid").mkdir()
    (tmp_path / "cnn_grid" / "results.csv").write_text("\n".join(lines) + "\n")
    table, _ = report.build(tmp_path)
    rows = {
        line.split(" | ")[0][2:]: line for line in table.splitlines() if report.CNN_GRID in line
    }
    quant = next(v for k, v in rows.items() if k.startswith("quantization only"))
    assert "no quantization-only design within 1 point" in quant
    assert "the closest: w2/a2, 88.53% ± 0.21, **16.0X** | differs |" in quant
    optimal = rows["2/2/4X is the optimal joint design"]
    assert "front in 3 of 3 seeds" in optimal
    assert optimal.endswith("| not tested: no smaller design in this grid |")
