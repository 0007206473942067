#!/usr/bin/env bash
# Prepares Fashion-MNIST for qsparse, once, with no network beyond the Debian mirror.
#
#   scripts/prepare_data.sh                # into $QSPARSE_DATA_DIR or ~/.cache/qsparse/tfds
#   PYTHON=/path/to/python scripts/prepare_data.sh
#
# Installs Debian's dataset-fashion-mnist package (the four IDX files) when running as root and
# it is missing, then converts the files once through qsparse's TFDS builder; later
# `qsparse.data.load("fashion_mnist")` calls only read the prepared data.
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

package=dataset-fashion-mnist
if command -v dpkg >/dev/null && ! dpkg -s "$package" >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "Installing $package ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$package" >/dev/null
  else
    echo "Note: $package is not installed; as root: apt-get install $package" >&2
  fi
fi
if command -v dpkg >/dev/null && dpkg -s "$package" >/dev/null 2>&1; then
  echo "IDX files of $package:"
  dpkg -L "$package" | grep 'idx.-ubyte' | sed 's/^/  /'
fi

"$PYTHON" -m qsparse.data --prepare fashion_mnist "$@"
