#!/usr/bin/env bash
# Install test dependencies and run the tests (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch==2.13.0 first: on these machines it is a CPU build on disk; any other spec
# downloads GBs of CUDA packages.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[train,test]"
ruff check .
mypy
python -m pytest "$@"
