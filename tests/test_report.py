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
