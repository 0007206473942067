#!/usr/bin/env bash
# THE test command: sets up what is missing (virtual environment, package), then runs the linter,
# the formatter check and the whole pytest suite, one test file per worker process (one more than
# the cores, at most 4: compilation is single-threaded, and a worker that waits on the processes a
# test starts leaves its core to the others).
# Extra arguments go to pytest (`-n 0` runs in one process); the 15 slowest tests are listed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
VENV="${QSPARSE_VENV:-$ROOT/.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
export JAX_PLATFORMS=cpu
WORKERS=$(( $(nproc 2>/dev/null || echo 2) + 1 ))
[ "$WORKERS" -gt 4 ] && WORKERS=4
"$VENV/bin/python" -m pytest tests -n "$WORKERS" --dist loadfile --durations=15 "$@"
