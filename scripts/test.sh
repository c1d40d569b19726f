#!/usr/bin/env bash
# Install vsrkit with its test dependencies, then run the whole suite.
# BasicSR 1.4.2 is the reference oracle; its declared dependencies would replace torch, so it
# is installed without them (its arch files need only torch and torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e '.[test]'
python -m pip install -q --disable-pip-version-check --no-deps basicsr==1.4.2
ruff check src tests benchmarks
python -m pytest -q -ra "$@"
