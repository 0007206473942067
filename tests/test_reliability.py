"""Bad input fails fast with one line; kills, damaged checkpoints and reruns lose nothing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from killing import killed_at_checkpoint, run_to_end, run_until

from configs import digits
from experiments import common
from experiments.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "num_epochs": 10,
    "sparsity.prune_begin_epoch": 2,
    "sparsity.prune_end_epoch": 6,
    "checkpoint_every_epochs": 1,
}


def config(**extra):
    c = digits.get_config()
    for k, v in {**OVERRIDES, **extra}.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def cli(workdir, *args):
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        *flags,
        *args,
    ]


def final_params(workdir):
    _, _, state, _ = common.restore_run(workdir)
    return jax.tree.leaves(state.params)


def assert_same_params(a, b):
    pa, pb = final_params(a), final_params(b)
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = tmp_path_factory.mktemp("reference")
    return wd, train_and_evaluate(config(), wd)


BAD = [
    ("--config.quant.wbits=2", "wbits"),
    ("--config.quant.w_bits=0", "quant.w_bits=0"),
    ("--config.quant.a_bits=2.5", "quant.a_bits"),
    ("--config.sparsity.compression=0.5", "sparsity.compression=0.5"),
    ("--config.sparsity.block_shape=(7,7)", "sparsity.block_shape=(7, 7)"),
    ("--config.dataset=mnits", "dataset='mnits'"),
    ("--config.model.hidden=(0,)", "model.hidden=(0,)"),
    ("--config.idx_dir=/no/such/dir", "idx_dir='/no/such/dir'"),
    ("--config.learning_rate=0", "learning_rate=0"),
    ("--config.batch_size=5000", "batch_size=5000"),
    ("--config.sparsity.prune_begin_epoch=8", "prune_begin_epoch"),
    ("--config.sparsity.prune_end_epoch=99", "prune_end_epoch"),
    ("--config.sparsity.balanced=cols", "sparsity.balanced='cols'"),
    ("--config.quant.weight_grad=ste", "quant.weight_grad='ste'"),
]


def test_bad_inputs_one_line_exit_2_workdir_untouched(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "keep.txt").write_text("precious")
    procs = []
    for arg, _ in BAD:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        procs.append(
            subprocess.Popen(
                cli(wd, arg),
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for (arg, expect), p in zip(BAD, procs):
        out, err = p.communicate(timeout=300)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert p.returncode == 2, (arg, p.returncode, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (arg, err)
        assert expect in lines[0], (arg, lines[0])
        assert "Traceback" not in err + out
    assert sorted(os.listdir(wd)) == ["keep.txt"]
    assert (wd / "keep.txt").read_text() == "precious"


def test_same_seed_same_results_and_params(tmp_path, reference):
    ref_wd, ref = reference
    again = train_and_evaluate(config(), tmp_path)
    for key in ("test_accuracy", "weight_memory_bits", "block_sparsity", "steps"):
        assert again[key] == ref[key]
    assert [h["train_loss"] for h in again["history"]] == [h["train_loss"] for h in ref["history"]]
    assert_same_params(ref_wd, tmp_path)


def _corrupt(step_dir: Path, how: str):
    files = [f for f in step_dir.rglob("*") if f.is_file()]
    assert files
    for f in files:
        if how == "truncate":
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 3])
        else:
            f.write_bytes(os.urandom(64))


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_damaged_latest_checkpoint_falls_back(tmp_path, reference, how, capsys):
    ref_wd, ref = reference
    c = config()
    with killed_at_checkpoint(7):
        train_and_evaluate(c, tmp_path)
    ckpts = tmp_path / "checkpoints"
    latest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    _corrupt(ckpts / str(latest), how)
    warnings = []
    mgr = common.checkpoint_manager(ckpts, c.keep_checkpoints)
    step, _, meta = common.restore_checkpoint(
        mgr,
        common.init_state(common.build_run(c), common.make_spec(common.build_run(c)), c.seed),
        log=warnings.append,
    )
    assert step < latest and meta["epoch"] == 6 and "damaged" in warnings[0]
    r = train_and_evaluate(c, tmp_path)
    assert r["test_accuracy"] == ref["test_accuracy"]
    assert_same_params(ref_wd, tmp_path)


def test_all_checkpoints_damaged_never_starts_from_scratch(tmp_path):
    c = config(num_epochs=3, **{"sparsity.prune_begin_epoch": 1, "sparsity.prune_end_epoch": 2})
    with killed_at_checkpoint(2):
        train_and_evaluate(c, tmp_path)
    for d in (tmp_path / "checkpoints").iterdir():
        if d.name.isdigit():
            _corrupt(d, "garbage")
    with pytest.raises(RuntimeError, match="not starting from scratch"):
        train_and_evaluate(c, tmp_path)


def test_sigkill_at_several_points_resumes_bit_exact(tmp_path, reference):
    ref_wd, ref = reference
    wd = tmp_path / "killed"
    ckpts = wd / "checkpoints"

    def after_epoch(k):
        return lambda out, _: f"epoch {k}/10 " in out

    def during_save(out, ck):
        # An Orbax save writes into a *.orbax-checkpoint-tmp* directory, then renames it.
        return "epoch 5/" in out and ck.exists() and any("tmp" in p.name for p in ck.iterdir())

    kills = 0
    for pred in (after_epoch(2), during_save, after_epoch(8)):
        _, killed = run_until(cli(wd), pred, ckpts)
        kills += killed
    assert kills >= 2
    # A save cut short leaves a temporary directory behind; plant one to be sure it is ignored.
    good = sorted((p for p in ckpts.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    fake = ckpts / f"{int(good[-1].name) + 22}.orbax-checkpoint-tmp-1234"
    shutil.copytree(good[-1], fake)
    _corrupt(fake, "truncate")
    out = run_to_end(cli(wd))
    assert "resumed from step" in out.stdout
    import json

    r = json.loads((wd / "results.json").read_text())
    assert r["test_accuracy"] == ref["test_accuracy"]
    assert [h["epoch"] for h in r["history"]] == list(range(1, 11))
    assert_same_params(ref_wd, wd)
