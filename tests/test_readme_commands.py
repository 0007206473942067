"""Every command the README prints after the quick start runs as printed, on tiny settings.

The quick start has made `.venv` (this interpreter) and trained `runs/default`; here `runs/`
is a temporary directory, trainings get a few epochs on scikit-learn's digits, and the decoder
reads the digits test split written as IDX files where the README names Fashion-MNIST's.
"""

import gzip
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from qsparse import data

ROOT = pathlib.Path(__file__).resolve().parents[1]
FMNIST_IDX = "/usr/share/datasets/fashion-mnist"
TINY = [
    "--config.dataset=digits",
    "--config.num_epochs=2",
    "--config.sparsity.prune_begin_epoch=0",
    "--config.sparsity.prune_end_epoch=1",
    "--config.sparsity.prune_every_steps=2",
]
# Long studies and the benchmark: checked for syntax and options, not run here.
STUDIES = ("scripts/reproduce.sh", "scripts/resnet_study.sh", "scripts/bench.py")


def readme_commands() -> list[str]:
    """The commands of every bash block after the quick start, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index("\n## ", text.index("## Quick start")) :]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", after, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(" ".join(line.split()))
    return commands


def _write_idx(directory: pathlib.Path, images: np.ndarray, labels: np.ndarray) -> None:
    directory.mkdir(parents=True)
    n, h, w = images.shape[:3]
    head = bytes([0, 0, 8, 3]) + np.array([n, h, w], ">u4").tobytes()
    with gzip.open(directory / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(head + images.astype(np.uint8).tobytes())
    with gzip.open(directory / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(
            bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes() + labels.astype(np.uint8).tobytes()
        )


def _run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    return done


def _as_run_here(command: str, tmp: pathlib.Path) -> list[str]:
    """The README command with its runs/ and data paths moved to `tmp`, tiny where it trains."""
    argv = shlex.split(
        command.replace("runs/", f"{tmp}/runs/").replace(FMNIST_IDX, str(tmp / "idx"))
    )
    if argv[0] == ".venv/bin/python":
        argv[0] = sys.executable
    elif argv[0] == ".venv/bin/jupyter":
        argv[0] = str(pathlib.Path(sys.executable).with_name("jupyter"))
    if argv[1:3] == ["-m", "experiments.train"]:
        argv += TINY
    return argv


@pytest.mark.slow
def test_every_readme_command_after_the_quick_start_runs(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", QSPARSE_SWEEP_DIR=str(tmp_path / "runs" / "smoke"))
    # What the quick start leaves behind, tiny: runs/default, and the test images for the decoder.
    _run(
        [sys.executable, "-m", "experiments.train", "--config=configs/default.py"]
        + [f"--workdir={tmp_path}/runs/default", *TINY],
        env,
    )
    digits = data.load("digits")
    _write_idx(tmp_path / "idx", digits.test_x[..., 0], digits.test_y)

    seen, background = set(), []
    port = str(_free_port())
    for command in readme_commands():
        command = command.replace("127.0.0.1:12355", f"127.0.0.1:{port}")
        if command.startswith("pip install"):
            seen.add("pip")  # what it installs: tests/test_install.py
            continue
        if "CONFIG" in command or "[" in command:
            seen.add("usage")  # a usage line with placeholders: tests/test_cli.py runs its forms
            continue
        script = next((s for s in STUDIES if s in command), None)
        if script:
            if script.endswith(".sh"):
                _run(["bash", "-n", script], env)
            else:
                _run([sys.executable, script, "--help"], env)
            seen.add("study")
            continue
        if command.endswith(" &"):  # one process of a multi-process run, the next in front
            argv = _as_run_here(command[:-2], tmp_path)
            background.append(subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE))
            continue
        argv = _as_run_here(command, tmp_path)
        done = _run(argv, env)
        for p in background:
            assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]
            seen.add("processes")
        background = []
        if "decode_numpy.py" in command:
            assert json.loads(done.stdout)["examples"] == len(digits.test_y)
            seen.add("decoder")
        elif "jupyter" in command:
            seen.add("notebook")
        else:
            seen.add(argv[2].split(".")[-1])
    assert seen >= {"train", "sweep", "export", "decoder", "notebook", "processes"}, seen
    assert (tmp_path / "runs" / "digits2" / "results.json").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
