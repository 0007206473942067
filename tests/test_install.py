"""The library installs and imports without the experiment stack."""

import pathlib
import re
import subprocess
import sys

from setuptools.config.setupcfg import read_configuration

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT_STACK = (
    "clu",
    "orbax",
    "tensorflow_datasets",
    "sklearn",
    "matplotlib",
    "tqdm",
    "tensorboardX",
    "ml_collections",
)
LIBRARY = ("quant", "sparsity", "wrap", "optim", "memory", "training", "export", "models")

_BLOCKED_IMPORT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import {modules}
print("imported")
"""


def test_library_requires_only_jax_flax_optax_numpy():
    options = read_configuration(ROOT / "setup.cfg")["options"]
    names = {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0] for r in options["install_requires"]}
    assert names == {"jax", "flax", "optax", "numpy"}
    # experiments/ and configs/ stay in the repository, not top-level packages in site-packages.
    assert options["packages"] and all(p.split(".")[0] == "qsparse" for p in options["packages"])
    extra = " ".join(options["extras_require"]["experiments"])
    assert all(dep in extra for dep in ("clu", "orbax-checkpoint", "tensorflow-datasets"))


def test_library_modules_import_with_the_experiment_stack_blocked():
    code = _BLOCKED_IMPORT.format(
        blocked=set(EXPERIMENT_STACK), modules=", ".join(f"qsparse.{m}" for m in LIBRARY)
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "imported"


def test_blocking_is_effective():
    code = _BLOCKED_IMPORT.format(blocked={"clu"}, modules="clu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "blocked: clu" in done.stderr
