#!/usr/bin/env bash
# Creates the virtual environment (default .venv, or $QSPARSE_VENV) and installs qsparse with
# its experiment and test extras. Idempotent: reinstalls only when setup.cfg changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QSPARSE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian's python3 ships venv separately; fall back to virtualenv from pip.
    rm -rf "$VENV"
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) \
        >/dev/null 2>&1 || true
    fi
    "$PY" -m venv "$VENV" 2>/dev/null || { "$PY" -m pip install -q virtualenv && "$PY" -m virtualenv -q "$VENV"; }
  fi
fi

STAMP="$VENV/.qsparse-installed"
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing qsparse and its dependencies into $VENV (about a minute)"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e "$ROOT[experiments,test]"
  echo "$WANT" > "$STAMP"
fi
