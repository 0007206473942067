#!/usr/bin/env bash
# THE test command: sets up what is missing (virtual environment, package), then runs the linter,
# the formatter check and the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
VENV="${QSPARSE_VENV:-$ROOT/.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
export JAX_PLATFORMS=cpu
"$VENV/bin/python" -m pytest tests "$@"
