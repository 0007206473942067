"""The command lines a new user types: bad configs and fields are one line and exit 2, and
scripts/run.sh takes [CONFIG] [WORKDIR] [--flags ...] (tested with a stand-in Python)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import common, export

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _cli(module, *args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *args],
        cwd=cwd,
        env={**ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "module, offered, not_offered",
    [
        ("train", "configs/default.py", "configs/sweep_digits_smoke.py"),
        ("sweep", "configs/sweep_digits_smoke.py", "configs/default.py"),
    ],
)
def test_missing_config_file_is_one_line_naming_the_configs(module, offered, not_offered, tmp_path):
    out = _cli(module, "--config=configs/nope.py", f"--workdir={tmp_path / 'wd'}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: --config=configs/nope.py: no such file; use one of ")
    assert offered in lines[0] and not_offered not in lines[0]
    assert not (tmp_path / "wd").exists()


def test_unknown_field_is_one_line_with_a_suggestion(tmp_path):
    out = _cli(
        "train",
        "--config=configs/digits.py",
        f"--workdir={tmp_path / 'wd'}",
        "--config.quant.wbits=3",
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --config.quant.wbits=3: no such config field 'quant.wbits'; "
        "did you mean 'quant.w_bits'?"
    ]


def test_check_config_args():
    check = common.check_config_args
    ok = ["prog", "--config=configs/digits.py", "--workdir=x"]
    assert check(ok, "train") is None
    assert (
        check(["prog", "--config", "configs/digits.py", "--config.quant.w_bits=3"], "train") is None
    )
    assert check(["prog", "--config=configs/sweep_digits_smoke.py"], "sweep") is None
    assert check(["prog", "--help"], "train") is None  # absl prints the help
    assert check(["prog", "--workdir=x"], "train").startswith("--config is required: use one of")
    assert "configs/default.py" in check(["prog", "--workdir=x"], "train")
    # The last --config wins, as in absl.
    assert (
        check(["prog", "--config=configs/nope.py", "--config=configs/digits.py"], "train") is None
    )
    assert check(["prog", "--config=configs"], "train").startswith(
        "--config=configs: not a Python config file; use one of"
    )
    assert check(ok + ["--config.qant.w_bits=3"], "train") == (
        "--config.qant.w_bits=3: no such config field 'qant'; did you mean 'quant'?"
    )
    assert check(ok + ["--config.quant.w_bits.x=3"], "train") == (
        "--config.quant.w_bits.x=3: quant.w_bits is a value, not a group of fields"
    )
    assert check(ok + ["--noconfig.quant.lern_clip"], "train") == (
        "--noconfig.quant.lern_clip: no such config field 'quant.lern_clip'; "
        "did you mean 'quant.learn_clip'?"
    )
    assert check(ok + ["--", "--config.nope=1"], "train") is None  # after '--': not flags
    assert check(["prog", "--config=configs/sweep_digits_smoke.py"], "train").startswith(
        "--config=configs/sweep_digits_smoke.py is a sweep config: run it with python -m "
        "experiments.sweep"
    )


def test_broken_config_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    raise RuntimeError('oops\\nsecond line')\n")
    assert common.check_config_args(["prog", f"--config={bad}"], "train") == (
        f"--config={bad}: cannot load it (RuntimeError: oops)"
    )


def test_export_setting_only_for_sweeps(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "digits"}))
    with pytest.raises(common.ConfigError, match="is a training run, not a sweep"):
        export.open_design(tmp_path, 0)
    assert export.default_output(tmp_path) == tmp_path / "model.qsp"
    assert export.default_output(tmp_path, 3) == tmp_path / "setting_3.qsp"


# ---------------------------------------------------------------------------------------------
# scripts/run.sh, with a stand-in virtual environment whose python only records its arguments
# (setup.sh sees it installed; no data is prepared and nothing is trained).


@pytest.fixture
def fake_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.txt"
    for name, prints in (("python", ""), ("dpkg", "echo /data/train-images-idx3-ubyte.gz\n")):
        exe = venv / "bin" / name  # dpkg: the data's Debian package looks installed
        exe.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n{prints}')
        exe.chmod(0o755)
    stamp = (ROOT / "setup.cfg").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
    (venv / ".qsparse-installed").write_text(hashlib.sha256(stamp).hexdigest() + "\n")
    return venv, log


def _run_sh(fake_venv, *args):
    venv, log = fake_venv
    env = {**ENV, "QSPARSE_VENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "scripts/run.sh", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = log.read_text().splitlines() if log.exists() else []
    train = [c for c in calls if c.startswith("python -m experiments.train ")]
    return out, train


@pytest.mark.parametrize(
    "args, expected, workdir",
    [
        ((), "--config=configs/default.py --workdir=runs/default", "runs/default"),
        (
            ("--config.quant.w_bits=3",),
            "--config=configs/default.py --workdir=runs/default --config.quant.w_bits=3",
            "runs/default",
        ),
        (
            ("configs/digits.py", "--config.num_epochs=1"),
            "--config=configs/digits.py --workdir=runs/digits --config.num_epochs=1",
            "runs/digits",
        ),
        (
            ("configs/digits.py", "runs/d1", "--overwrite"),
            "--config=configs/digits.py --workdir=runs/d1 --overwrite",
            "runs/d1",
        ),
        (
            ("--config.quant.w_bits=3", "--workdir=runs/w3"),
            "--config=configs/default.py --workdir=runs/w3 --config.quant.w_bits=3 "
            "--workdir=runs/w3",
            "runs/w3",
        ),
    ],
)
def test_run_sh_arguments(fake_venv, args, expected, workdir):
    out, train = _run_sh(fake_venv, *args)
    assert out.returncode == 0, out.stderr
    assert train == [f"python -m experiments.train {expected}"]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith(f"results: {workdir}/results.json;")
    assert f"{workdir}/events.out.tfevents.*" in last
    assert "tensorboard --logdir" not in out.stdout + out.stderr


def test_run_sh_missing_config_is_one_line_before_setup(fake_venv):
    out, train = _run_sh(fake_venv, "configs/nope.py")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: CONFIG=configs/nope.py does not exist: use one of "
    )
    assert "configs/default.py" in lines[0] and "sweep_digits_smoke" not in lines[0]
    assert train == [] and not fake_venv[1].exists()  # nothing ran, not even the setup
    assert out.stdout == ""
