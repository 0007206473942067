"""Sweeps: a chunked, sharded sweep equals separate runs, compiles once per shape, resumes."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from killing import killed_at_checkpoint, run_to_end, run_until

from configs import sweep_digits_smoke
from experiments import common, sweep
from experiments.train import train_and_evaluate
from qsparse import data as qdata
from qsparse import training

ROOT = Path(__file__).resolve().parent.parent
# Results that must agree between runs; the rest is timing (and chunk numbers when layouts
# differ on purpose).
IGNORED = set(sweep.TIMING_COLUMNS) | {"chunk"}
MEMORY = [
    "block_sparsity",
    "weight_memory_bits",
    "fp32_weight_memory_bits",
    "weight_compression",
    "peak_activation_bits",
    "total_activation_bits",
    "total_memory_bits",
    "num_params",
    "steps",
]


def tiny_config(**over):
    """4 settings (w {2, 32} x a {2, 32} at 4X) on digits, MLP 64-64-10, 4 epochs.

    chunk_size=3 makes two chunks, the second padded (1 real setting + 2 copies).
    """
    c = sweep_digits_smoke.get_config()
    c.model.hidden = (64,)
    c.num_epochs = 4
    c.sparsity.prune_begin_epoch = 1
    c.sparsity.prune_end_epoch = 3
    c.checkpoint_every_epochs = 1
    c.sweep.compression = [4.0]
    c.sweep.chunk_size = 3
    c.sweep.vectorize = "map"
    for k, v in over.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in IGNORED} for r in rows]


# The compiled programs this module's sweeps share, as the sweeps of one notebook would.
PROGRAMS = sweep.Programs()


def run_counted(config, workdir, fresh=False, **kw):
    """run_sweep and the traces it made; ``fresh``: forget the programs compiled so far."""
    if fresh:
        PROGRAMS.compiled.clear()
    PROGRAMS.traces.clear()
    rows = sweep.run_sweep(config, workdir, progress=False, programs=PROGRAMS, **kw)
    return rows, dict(PROGRAMS.traces)


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    wd = tmp_path_factory.mktemp("sweep_map")
    rows, traces = run_counted(tiny_config(), wd, fresh=True)
    return wd, rows, traces


@pytest.fixture(scope="module")
def vmapped(tmp_path_factory):
    wd = tmp_path_factory.mktemp("sweep_vmap")
    rows, traces = run_counted(tiny_config(**{"sweep.vectorize": "vmap"}), wd)  # only vmap here
    return wd, rows, traces


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    """experiments.train on each setting alone (the sweep's reference)."""
    config = tiny_config()
    out = []
    for s in sweep.enumerate_settings(config):
        wd = tmp_path_factory.mktemp(f"train_{s.id}")
        out.append(train_and_evaluate(sweep.setting_config(config, s), wd))
    return out


def test_outputs_and_one_compilation_per_shape(mapped, vmapped):
    for wd, rows, traces in (mapped, vmapped):
        assert len(rows) == 4 and [r["setting"] for r in rows] == [0, 1, 2, 3]
        assert [r["chunk"] for r in rows] == [0, 0, 0, 1]  # padding dropped
        shape = ("mlp", (64,), (32, 64))
        # Two chunks (3 settings, then 1 padded to 3), four epochs each: one trace each.
        assert traces == {("epoch", shape): 1, ("eval", shape): 1}
        for name in ("results.csv", "pareto.csv", "pareto.png", "pareto_weight.png"):
            assert (wd / name).stat().st_size > 0, name
        assert "Pareto front" in (wd / "summary.md").read_text()
        assert sweep.read_results(wd / "results.csv") == rows
        for r in rows:
            assert not r["diverged"] and r["diverged_step"] == -1
            assert r["steps"] == 4 * (1437 // 64)
            assert r["total_memory_bits"] == r["weight_memory_bits"] + r["peak_activation_bits"]
            assert r["block_sparsity"] == pytest.approx(0.75, abs=0.01)
            assert r["block_compression"] == 4.0
        header = (wd / "results.csv").read_text().splitlines()[0].split(",")
        assert "block_compression" in header and "peak_activation_bits" in header
        assert "compression" not in header and "activation_memory_bits" not in header
        assert "| block_compression |" in (wd / "summary.md").read_text()
        assert [sweep.label(r) for r in rows] == [
            "w2/a2/4x",
            "w2/a32/4x",
            "w32/a2/4x",
            "w32/a32/4x",
        ]


def test_map_equals_separate_runs_exactly(mapped, separate):
    _, rows, _ = mapped
    for r, ref in zip(rows, separate):
        assert (r["w_bits"], r["a_bits"]) == (ref["w_bits"], ref["a_bits"])
        assert r["test_accuracy"] == pytest.approx(ref["test_accuracy"], abs=1e-4)
        for k in MEMORY:
            assert r[k] == ref[k], k


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Two designs (w {2, 32}, a2, 4X) x seeds {0, 1, 2}: six runs in one chunk."""
    wd = tmp_path_factory.mktemp("sweep_seeds")
    c = tiny_config(
        **{"sweep.w_bits": [2, 32], "sweep.a_bits": [2], "sweep.seeds": [0, 1, 2]},
        **{"sweep.chunk_size": 6},
    )
    rows, traces = run_counted(c, wd)
    return c, wd, rows, traces


def test_seeds_share_one_program_and_each_equals_its_lone_run(seeded, tmp_path):
    c, _, rows, traces = seeded
    assert [(r["w_bits"], r["seed"]) for r in rows] == [(w, s) for w in (2, 32) for s in (0, 1, 2)]
    assert len(traces) == 2 and set(traces.values()) == {1}  # one epoch, one eval program
    assert len({r["test_accuracy"] for r in rows}) > 2  # the seeds do differ
    for r in rows[1:3]:  # 2-bit weights and activations: the most sensitive to sum order
        s = next(s for s in sweep.enumerate_settings(c) if s.id == r["setting"])
        ref = train_and_evaluate(sweep.setting_config(c, s), tmp_path / str(s.id))
        assert ref["config"]["seed"] == r["seed"]
        assert r["train_loss"] == ref["history"][-1]["train_loss"]
        for k in ("test_accuracy", *MEMORY):
            assert r[k] == ref[k], k  # bit for bit in the map loop


def test_design_rows_are_means_over_seeds_and_count_each_seeds_front(seeded):
    _, wd, rows, _ = seeded
    designs = sweep.read_results(wd / "means.csv")
    assert [(d["w_bits"], d["seeds"]) for d in designs] == [(2, 3), (32, 3)]
    for d in designs:
        runs = [r for r in rows if r["w_bits"] == d["w_bits"]]
        acc = [r["test_accuracy"] for r in runs]
        assert d["test_accuracy"] == pytest.approx(np.mean(acc), abs=1e-12)
        assert d["test_accuracy_std"] == pytest.approx(np.std(acc, ddof=1), abs=1e-12)
        assert (
            d["setting"] == runs[0]["setting"]
            and d["weight_memory_bits"] == runs[0]["weight_memory_bits"]
        )
    front = sweep.read_results(wd / "pareto.csv")
    assert {(f["frontier"], f["setting"]) for f in front} == {
        (name, designs[i]["setting"]) for name, idx in sweep.fronts(designs).items() for i in idx
    }
    summary = (wd / "summary.md").read_text()
    assert "2 designs x 3 seeds" in summary and " ± " in summary
    assert "On the front of every seed:" in summary


def test_design_rows_say_which_designs_are_on_the_front_in_only_some_seeds():
    def run(design, seed, acc, bits):
        return {
            "model": "mlp",
            "arch": "mlp",
            "hidden": "64",
            "w_bits": design,
            "a_bits": 32,
            "block_compression": 1.0,
            "learning_rate": 1e-3,
            "prox_strength": 0.0,
            "setting": 10 * design + seed,
            "seed": seed,
            "test_accuracy": acc,
            "test_loss": 1.0 - acc,
            "train_loss": 1.0 - acc,
            "diverged": False,
            "weight_memory_bits": bits,
            "total_memory_bits": bits,
        }

    # Design 2 is dominated by design 1 in seed 1 only (less accurate with more memory).
    rows = [run(1, 0, 0.80, 100), run(1, 1, 0.90, 100), run(2, 0, 0.85, 200), run(2, 1, 0.88, 200)]
    d = {r["w_bits"]: r for r in sweep.design_rows(rows)}
    assert d[1]["front_weight_seeds"] == 2 and d[2]["front_weight_seeds"] == 1
    assert d[2]["test_accuracy"] == pytest.approx(0.865)
    assert d[1]["test_accuracy"] == pytest.approx(0.85)
    assert d[1]["test_accuracy_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert d[2]["setting"] == 20 and d[1]["seeds"] == 2
    # On the means design 2 (0.865) beats design 1 (0.85): both on the front.
    assert sorted(sweep.fronts(list(d.values()))["weight"]) == [0, 1]


def test_vmap_equals_separate_runs(vmapped, separate):
    """Within float tolerance; joint low-bit settings only within run-to-run noise.

    vmap sums batched reductions in another order (last-bit differences); a 2-bit weight and
    2-bit activation setting amplifies them into other quantized codes (see sweep.py).
    """
    _, rows, _ = vmapped
    for r, ref in zip(rows, separate):
        chaotic = r["w_bits"] <= 4 and r["a_bits"] <= 4
        assert r["test_accuracy"] == pytest.approx(
            ref["test_accuracy"], abs=0.05 if chaotic else 1e-4
        )
        for k in MEMORY:
            if not chaotic:
                assert r[k] == ref[k], k
        assert r["num_params"] == ref["num_params"] and r["steps"] == ref["steps"]


def test_pareto_rows_are_results_and_undominated(mapped):
    wd, rows, _ = mapped
    front = sweep.read_results(wd / "pareto.csv")
    assert {r["frontier"] for r in front} == {"total", "weight"}
    results = {r["setting"]: r for r in rows}
    for f in front:
        mem = sweep.FRONTIERS[f["frontier"]]
        assert {k: f[k] for k in sweep.COLUMNS} == results[f["setting"]]
        assert f["seeds"] == 1 and math.isnan(f["test_accuracy_std"])
        for r in rows:
            dominates = (
                r["test_accuracy"] >= f["test_accuracy"]
                and r[mem] <= f[mem]
                and (r["test_accuracy"] > f["test_accuracy"] or r[mem] < f[mem])
            )
            assert not dominates, (r["setting"], f["setting"], f["frontier"])


def test_load_setting_gives_reported_accuracy(mapped):
    wd, rows, _ = mapped
    evaluate = None
    for sid in (1, 3):  # one in a full chunk, one in the padded chunk
        run, spec, state = sweep.load_setting(wd, sid)
        assert run.config.quant.w_bits == rows[sid]["w_bits"]
        dev = qdata.to_device(run.dataset)
        if evaluate is None:  # the settings share a shape: one compilation serves both
            evaluate = jax.jit(training.make_eval(run.model, run.plan, run.config.eval_batch_size))
        ev = evaluate(state.params, spec, dev["test_x"], dev["test_y"])
        assert float(ev["accuracy"]) == pytest.approx(rows[sid]["test_accuracy"], abs=1e-4)
        assert (
            common.result_metrics(run, state, spec, 0.0)["weight_memory_bits"]
            == (rows[sid]["weight_memory_bits"])
        )


def test_export_one_design_of_a_sweep(mapped, tmp_path):
    from experiments import export

    wd, rows, _ = mapped
    info = export.export_run(wd, tmp_path / "s3.qsp", setting=3)  # the padded chunk's setting
    assert info["packed_accuracy"] == info["trained_accuracy"] and info["same_predictions"]
    assert info["trained_accuracy"] == pytest.approx(rows[3]["test_accuracy"], abs=1e-4)
    assert info["meta"]["setting"] == 3
    assert info["meta"]["results_test_accuracy"] == rows[3]["test_accuracy"]
    payload_bits = 8 * info["payload_bytes"]
    assert abs(payload_bits - rows[3]["weight_memory_bits"]) <= 0.01 * payload_bits
    with pytest.raises(common.ConfigError, match=r"use 0\.\.3"):
        export.open_design(wd, 4)
    # The CLI: without --setting, one line saying how to pick a design.
    out = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"--workdir={wd}"],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: workdir={str(wd)!r} is a sweep of 4 settings: pass --setting=N (0..3, the "
        "setting column of its results.csv) to export one design"
    ]
    assert not (wd / "model.qsp").exists()


def test_sweep_finished_under_the_old_result_names_reports_the_new_ones(mapped, tmp_path):
    """A sweep whose chunks were written before the rename (compression,
    activation_memory_bits; no total_activation_bits) resumes to today's results.csv."""
    import shutil

    wd, rows, _ = mapped
    old = tmp_path / "old"
    shutil.copytree(wd, old, ignore=shutil.ignore_patterns("results.csv", "pareto*", "summary.md"))
    renamed = {"block_compression": "compression", "peak_activation_bits": "activation_memory_bits"}
    for f in (old / "chunks").glob("chunk_*.json"):
        chunk = json.loads(f.read_text())
        chunk["rows"] = [
            {renamed.get(k, k): v for k, v in r.items() if k != "total_activation_bits"}
            for r in chunk["rows"]
        ]
        f.write_text(json.dumps(chunk))
    again, traces = run_counted(tiny_config(), old)
    assert traces == {}  # nothing trained again
    assert comparable(again) == comparable(rows)
    assert comparable(sweep.read_results(old / "results.csv")) == comparable(rows)
    # A results.csv written under the old names reads back under the new ones.
    text = (old / "results.csv").read_text()
    for new, name in renamed.items():
        text = text.replace(new, name)
    (tmp_path / "old.csv").write_text(text)
    assert "activation_memory_bits" in text
    assert sweep.read_results(tmp_path / "old.csv") == sweep.read_results(old / "results.csv")


def test_block_mask_figure_has_a_colorbar(mapped):
    wd, rows, _ = mapped
    run, _, state = sweep.load_setting(wd, 0)
    fig = sweep.plot_block_masks(run, state, title="design 0")
    *maps, bar = fig.axes
    assert len(maps) == 2  # Dense_0 and Dense_1 (every layer has blocks)
    assert [t.get_text() for t in bar.get_yticklabels()] == ["pruned", "kept"]
    kept = [m.get_images()[0].get_array() for m in maps]
    assert np.mean(np.concatenate([k.ravel() for k in kept])) == pytest.approx(0.25, abs=0.02)
    assert all("kept" in m.get_title() for m in maps)
    assert fig._suptitle.get_text() == "design 0"


def lenet_config(**over):
    """tiny_config with a tiny LeNet (channels 8, 16; Dense 32): w {4, 32} x a {4, 32} at 2X,
    in two chunks of 2 (conv kernels 25x8 in blocks of 5x8, then 200x16, 64x32 in 8x8)."""
    c = {
        "model.name": "lenet",
        "model.channels": (8, 16),
        "model.hidden": (32,),
        "sparsity.first_block_shape": (5, 8),
        "learning_rate": 1e-2,
        "quant.scale_mode": "max",  # a max, not a sum: keeps 4-bit trajectories closer
        "sweep.w_bits": [4, 32],
        "sweep.a_bits": [4, 32],
        "sweep.compression": [2.0],
        "sweep.chunk_size": 2,
    }
    return tiny_config(**{**c, **over})


def test_conv_sweep_steps_every_setting_and_matches_scan(tmp_path):
    """A conv model on the CPU: a host loop of one program stepping both settings of a chunk
    (no convolution inside a loop). Each setting gets its lone run's numbers and the scanned
    epoch's (under lax.map) up to the order of float sums, which XLA may pick otherwise for
    settings side by side in one program."""
    config = lenet_config()
    rows, traces = run_counted(config, tmp_path / "steps", fresh=True)  # loop="auto"
    assert {p.loop for p in PROGRAMS.compiled.values()} == {"steps"}
    shape = ("lenet", (32,), (8, 16))
    assert traces == {("epoch", shape): 1, ("eval", shape): 1}  # two chunks, one program
    assert [r["chunk"] for r in rows] == [0, 0, 1, 1]
    settings = sweep.enumerate_settings(config)
    lone = train_and_evaluate(sweep.setting_config(config, settings[3]), tmp_path / "lone")
    assert (rows[3]["w_bits"], rows[3]["a_bits"]) == (lone["w_bits"], lone["a_bits"]) == (32, 32)
    assert rows[3]["test_accuracy"] == pytest.approx(lone["test_accuracy"], abs=1e-4)
    for k in MEMORY:
        assert rows[3][k] == lone[k], k
    scanned, _ = run_counted(config, tmp_path / "scan", loop="scan")
    assert {p.loop for p in PROGRAMS.compiled.values()} == {"steps", "scan"}
    for r, ref in zip(rows, scanned):
        assert (r["w_bits"], r["a_bits"]) == (ref["w_bits"], ref["a_bits"])
        assert not r["diverged"] and r["steps"] == 4 * (1437 // 64)
        assert r["test_accuracy"] > 0.6 and r["train_loss"] < 1.5  # chance: 0.1 and 2.3
        assert r["block_sparsity"] == pytest.approx(0.5, abs=0.02)
        # The float setting agrees to float tolerance; a 4-bit quantizer turns last-bit
        # differences of the step's sums into other codes, and those trajectories then differ
        # like runs of different seeds (see test_vmap_equals_separate_runs).
        chaotic = min(r["w_bits"], r["a_bits"]) <= 4
        assert r["test_accuracy"] == pytest.approx(
            ref["test_accuracy"], abs=0.1 if chaotic else 1e-4
        )
        for k in MEMORY:
            if not chaotic or k in ("num_params", "steps", "fp32_weight_memory_bits"):
                assert r[k] == ref[k], k


def test_killed_sweep_resumes_to_same_results(mapped, tmp_path, monkeypatch):
    _, rows, _ = mapped
    config = tiny_config()
    # Killed in the first chunk's third epoch (checkpointed after epoch 2), then in chunk 2
    # (the first chunk finishes its epochs 3 and 4, the second checkpoints its first epoch).
    with killed_at_checkpoint(2):
        run_counted(config, tmp_path)
    assert not (tmp_path / "results.csv").exists()
    with killed_at_checkpoint(3):
        run_counted(config, tmp_path)
    finished = tmp_path / "chunks" / "chunk_0.json"
    stamp = finished.stat().st_mtime_ns
    # Count the epochs the last call runs (the compiled program is reused from this process).
    calls = []
    for prog in PROGRAMS.compiled.values():
        epoch = prog.epoch
        monkeypatch.setattr(prog, "epoch", lambda *a, f=epoch: calls.append(1) or f(*a))
    resumed, traces = run_counted(config, tmp_path)
    assert traces == {} and len(calls) == 3  # chunk 1's epochs 2-4 only
    assert finished.stat().st_mtime_ns == stamp  # chunk 0 was not rerun
    assert comparable(resumed) == comparable(rows)
    assert comparable(sweep.read_results(tmp_path / "results.csv")) == comparable(rows)


_SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax
    sys.path.insert(0, sys.argv[2])
    from test_sweep import tiny_config
    from experiments import sweep

    assert jax.device_count() == 4, jax.devices()
    # The tiny grid plus a learning rate that makes every loss non-finite.
    config = tiny_config(**{"sweep.learning_rate": [3e-3, 1e30]})
    rows = sweep.run_sweep(config, sys.argv[1], progress=False)
    print(json.dumps({"rows": rows, "chunks": json.load(open(sys.argv[1] + "/chunks.json"))}))
    """
)


def test_sharded_equals_unsharded_and_divergence_is_contained(mapped, tmp_path):
    """4 forced CPU devices (fixed at JAX start, hence a subprocess) give the same numbers."""
    _, rows, _ = mapped
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(tmp_path / "wd"), str(Path(__file__).parent)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert [len(c["ids"]) for c in got["chunks"]] == [4, 4]  # settings split over 4 devices
    sharded = [r for r in got["rows"] if r["learning_rate"] == 3e-3]
    wild = [r for r in got["rows"] if r["learning_rate"] == 1e30]
    # The same settings as the 1-device, 2-chunk sweep, bit for bit (map mode), although they
    # shared chunks with diverging settings.
    key = lambda r: (r["w_bits"], r["a_bits"])  # noqa: E731
    ref = {key(r): r for r in comparable(rows)}
    for r in comparable(sharded):
        assert {k: v for k, v in r.items() if k not in ("setting", "learning_rate")} == {
            k: v for k, v in ref[key(r)].items() if k not in ("setting", "learning_rate")
        }
    assert all(r["diverged"] and r["diverged_step"] >= 0 for r in wild)
    assert all(not r["diverged"] for r in sharded)
    assert all(not math.isnan(r["test_accuracy"]) for r in got["rows"])


@pytest.mark.parametrize(
    "override, field",
    [
        ({"sweep.w_bits": [2, 9]}, "sweep.w_bits"),
        ({"sweep.a_bits": []}, "sweep.a_bits"),
        ({"sweep.compression": [0.5]}, "sweep.compression"),
        ({"sweep.chunk_size": 0}, "sweep.chunk_size"),
        ({"sweep.seeds": [-1]}, "sweep.seeds"),
        ({"sweep.vectorize": "pmap"}, "sweep.vectorize"),
        ({"recalibrate_batches": 5}, "recalibrate_batches=5 is not allowed: use 0 in a sweep"),
        ({"sweep.models": [{"name": "x", "hidden": [64], "widths": [3]}]}, "sweep.models[0]"),
        ({"sweep.models": [{"name": "x", "hidden": [0]}]}, "sweep.models[0].hidden"),
        ({"sweep.models": [{"name": "x", "hidden": [64], "w_bits": [5, 64]}]}, "w_bits"),
        ({"sweep.bit_pairs": [[2, 2], [2]]}, "sweep.bit_pairs"),
        ({"sweep.bit_pairs": [[2, 0]]}, "sweep.bit_pairs[0][1]"),
        ({"sweep.bit_pairs": [[2, 2], [2, 2]]}, "sweep.bit_pairs"),
        (
            {
                "sweep.bit_pairs": [[2, 2]],
                "sweep.models": [{"name": "x", "hidden": [8], "a_bits": [4]}],
            },
            "sweep.models[0].a_bits",
        ),
    ],
)
def test_bad_sweep_values_fail_before_compute(override, field, tmp_path):
    with pytest.raises(common.ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        sweep.run_sweep(tiny_config(**override), tmp_path / "wd", progress=False)
    assert not (tmp_path / "wd").exists()


def test_bit_pairs_replace_the_product_of_weight_and_activation_bits():
    pairs = [[2, 2], [32, 32]]
    product = sweep.enumerate_settings(
        tiny_config(**{"sweep.w_bits": [2, 32], "sweep.a_bits": [2, 32]})
    )
    paired = sweep.enumerate_settings(tiny_config(**{"sweep.bit_pairs": pairs}))
    assert len(product) == 2 * len(paired)
    assert {(s.w_bits, s.a_bits) for s in paired} == {(2, 2), (32, 32)}
    # Each paired setting is the product's setting of the same bits, model and seed.
    key = lambda s: (s.model, s.w_bits, s.a_bits, s.compression, s.seed)  # noqa: E731
    assert {key(s) for s in paired} <= {key(s) for s in product}


def test_cli_bad_value_is_one_line_exit_2(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.sweep",
            "--config=configs/sweep_digits_smoke.py",
            f"--workdir={tmp_path / 'wd'}",
            "--config.sweep.chunk_size=0",
        ],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: sweep.chunk_size=0 is not allowed: use an integer >= 1"
    ]


def test_chunks_round_to_devices_and_pad():
    settings = sweep.enumerate_settings(tiny_config(**{"sweep.seeds": [0, 1, 2]}))
    assert len(settings) == 12
    chunks = sweep.make_chunks(settings, chunk_size=5, num_devices=4)
    assert [len(c.ids) for c in chunks] == [8, 8] and [c.num_real for c in chunks] == [8, 4]
    assert chunks[1].ids[4:] == (11, 11, 11, 11)
    few = sweep.make_chunks(settings[:3], chunk_size=16, num_devices=2)
    assert [c.ids for c in few] == [(0, 1, 2, 2)]  # no more padding than the devices need
    np.testing.assert_array_equal(sorted({i for c in chunks for i in c.ids}), np.arange(12))


def _tiny_cli(workdir):
    """The command line of tiny_config (the `mapped` fixture's sweep)."""
    c = tiny_config()
    flags = {
        "model.hidden": "(64,)",
        "num_epochs": c.num_epochs,
        "sparsity.prune_begin_epoch": c.sparsity.prune_begin_epoch,
        "sparsity.prune_end_epoch": c.sparsity.prune_end_epoch,
        "checkpoint_every_epochs": 1,
        "sweep.compression": "[4.0]",
        "sweep.chunk_size": 3,
        "sweep.vectorize": "map",
    }
    return [
        sys.executable,
        "-m",
        "experiments.sweep",
        "--config=configs/sweep_digits_smoke.py",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in flags.items()),
    ]


def test_sigkilled_sweep_resumes_to_same_results(mapped, tmp_path):
    _, rows, _ = mapped
    wd = tmp_path / "killed"
    ckpts = wd / "checkpoints"

    def saved(chunk, epochs):
        # A chunk's checkpoints are numbered by step; wait for `epochs` of them.
        def pred(_, ck):
            d = ck / f"chunk_{chunk}"
            return d.exists() and sum(p.name.isdigit() for p in d.iterdir()) >= epochs

        return pred

    def during_save(_, ck):
        # An Orbax save writes into a *.orbax-checkpoint-tmp* directory, then renames it.
        d = ck / "chunk_1"
        return d.exists() and any("tmp" in p.name for p in d.iterdir())

    kills = 0
    for pred in (saved(0, 1), saved(0, 2), during_save):
        _, killed = run_until(_tiny_cli(wd), pred, ckpts)
        kills += killed
    assert kills >= 2 and not (wd / "results.csv").exists()
    run_to_end(_tiny_cli(wd))
    assert comparable(sweep.read_results(wd / "results.csv")) == comparable(rows)
