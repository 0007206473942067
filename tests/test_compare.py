"""experiments.compare: a rerun's results against the committed ones, within the seeds' noise."""

import json

import pytest

from experiments import compare

COLS = "model,seed,w_bits,a_bits,block_compression,test_accuracy,weight_memory_bits"
COLS += ",peak_activation_bits,total_memory_bits,weight_compression,diverged"


def _results(root, shift=0.0, moved=0.0, joint=0.889):
    """A grid of three designs over seeds 0-2 and one anchor pair. ``shift``: added to every
    accuracy; ``moved``: added to the w2/a2/4X design only."""
    grid = [COLS]
    for w, a, c, accs, bits in (
        (32, 32, 1, (0.900, 0.902, 0.898), 8000),
        (2, 32, 1, (0.897, 0.899, 0.896), 600),
        (2, 2, 4, (0.880, 0.860, 0.881), 150),
    ):
        extra = moved if (w, a, c) == (2, 2, 4) else 0.0
        for seed, acc in enumerate(accs):
            acc += shift + extra
            grid.append(f"m,{seed},{w},{a},{c},{acc},{bits},60,{bits + 60},{8000 / bits},false")
    (root / "grid").mkdir(parents=True)
    (root / "grid" / "results.csv").write_text("\n".join(grid) + "\n")
    (root / "anchors").mkdir()
    for name, acc in (("dense_fp32", 0.9), ("joint", joint)):
        (root / "anchors" / f"{name}.json").write_text(
            json.dumps({"test_accuracy": acc, "weight_compression": 56.7, "weight_memory_bits": 1})
        )
    return root


def test_a_design_moved_beyond_its_noise_is_named_and_noise_is_not(tmp_path):
    a = _results(tmp_path / "a")
    b = _results(tmp_path / "b", shift=0.001, moved=0.02, joint=0.87)
    rows = {d["design"]: d for d in compare.design_diffs(a, b)}
    assert len(rows) == 3
    # +0.1 point on every seed: the paired difference has no spread, so it is "beyond" too;
    # the moved design is +2.1 points in every seed.
    assert rows["m w2/a2/4X"]["diff"] == pytest.approx(2.1)
    assert rows["m w32/a32/1X"]["diff"] == pytest.approx(0.1)
    text = compare.compare(a, b)
    assert "| grid | 3 | 0.77 points | +2.10 (m w2/a2/4X) |" in text
    assert "| anchors/joint | 88.90% | 87.00% | -1.90 points |" in text
    # The joint anchor's gap crosses the claim's 1.5 points: its verdict row says so.
    joint_row = next(line for line in text.splitlines() if line.startswith("| joint 2-bit"))
    assert "(changed)" in joint_row


def test_noise_alone_is_not_beyond_two_standard_errors(tmp_path):
    a = _results(tmp_path / "a")
    b = tmp_path / "b"
    _results(b)
    lines = (b / "grid" / "results.csv").read_text().splitlines()
    # Seed-to-seed jitter of +-0.2 points around no difference.
    jitter = [0.002, -0.002, 0.001]
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        cells = line.split(",")
        cells[5] = str(float(cells[5]) + jitter[i % 3])
        out.append(",".join(cells))
    (b / "grid" / "results.csv").write_text("\n".join(out) + "\n")
    assert not any(d["beyond"] for d in compare.design_diffs(a, b))
    assert "(changed)" not in compare.compare(a, b)


def test_a_missing_directory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main([str(tmp_path), str(tmp_path / "nowhere")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "rerun=" in err and "is not a directory" in err
