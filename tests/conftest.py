"""Shared test settings: float32 CPU, deterministic; the longest files start first."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Files that take two minutes or more on 2 cores, longest first. `--dist loadfile` hands whole
# files to the workers in collection order; started last, these would leave a worker idle.
LONG_FILES = (
    "test_zoo.py",
    "test_multihost.py",
    "test_train.py",
    "test_models.py",
    "test_sweep.py",
    "test_readme_commands.py",
    "test_reliability.py",
    "test_export.py",
)


def pytest_collection_modifyitems(config, items):
    """Runs the files of :data:`LONG_FILES` first, in that order; the rest keep theirs."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
