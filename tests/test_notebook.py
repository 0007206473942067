"""experiments/analysis.ipynb runs top to bottom on a tiny sweep workdir (nbclient)."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from experiments import sweep

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "experiments" / "analysis.ipynb"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """The digits smoke sweep cut down as in test_sweep (whose compiled program it shares when
    both run in one pytest process)."""
    from test_sweep import tiny_config

    wd = tmp_path_factory.mktemp("nb_sweep")
    assert sweep.run_sweep(tiny_config(), wd, progress=False) is not None
    return wd


def test_analysis_notebook_runs(sweep_dir, monkeypatch):
    monkeypatch.setenv("QSPARSE_SWEEP_DIR", str(sweep_dir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # 2 fronts, the memory bars, the mask heatmaps, the weight histograms.
    assert len(images) >= 5
    text = "".join(o.get("text", "") for o in outputs)
    assert str(sweep_dir) in text and "design #" in text
    assert os.environ.get("QSPARSE_SWEEP_DIR") == str(sweep_dir)


def test_default_workdir_is_where_the_smoke_sweep_writes():
    """The parameter cell's WORKDIR is the --workdir of the smoke sweep command the README and
    experiments/sweep.py show, so the notebook opens what a new user just ran."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c.source for c in nb.cells if c.cell_type == "code")
    workdir = re.search(r'^WORKDIR = "([^"]+)"', params, re.M).group(1)
    smoke = r"--config=configs/sweep_digits_smoke\.py\s+(?:\\\s+)?--workdir=([^\s`]+)"
    shown = {
        name: set(re.findall(smoke, (ROOT / name).read_text()))
        for name in ("README.md", "experiments/sweep.py")
    }
    assert shown["experiments/sweep.py"] == {workdir}
    assert shown["README.md"] <= {workdir}, shown
