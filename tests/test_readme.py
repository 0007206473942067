"""The README's "own model" examples run exactly as printed."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _own_model_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Using the library on your own model")
    section = text[start : text.index("\n## ", start)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_linen_and_nnx_examples_run_as_printed(capsys):
    snippets = _own_model_snippets()
    assert len(snippets) == 2
    scope: dict = {}
    exec(compile(snippets[0], "README.md (Linen example)", "exec"), scope)  # noqa: S102
    num_params, compression = capsys.readouterr().out.split()
    assert int(num_params) == sum(
        p.size for p in scope["jax"].tree.leaves(scope["state"].params["params"])
    )
    assert float(compression) > 4
    assert scope["state"].model_state["batch_stats"]  # BatchNorm statistics were carried
    exec(compile(snippets[1], "README.md (NNX example)", "exec"), scope)  # noqa: S102
    assert float(scope["metrics"]["loss"]) > 0
    assert "conv" in scope["plan"].layers and "head" in scope["plan"].layers
