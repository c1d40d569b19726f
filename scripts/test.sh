#!/usr/bin/env bash
# Install vsrkit with its test dependencies, then run the whole suite.
# BasicSR 1.4.2 is the oracle of the three bicubic models; its declared dependencies would replace
# torch, so it is installed without them (its arch files need only torch and torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e '.[test]'
python -m pip install -q --disable-pip-version-check --no-deps basicsr==1.4.2
# mmagic 1.2.0 is RealBasicVSR's oracle: only its wheel is fetched (tests/mmagic_oracle.py reads
# its network files from it); installing it would pull mmcv/mmengine builds for another torch.
python -m pip download -q --disable-pip-version-check --no-deps mmagic==1.2.0 -d .cache/wheels
ruff check src tests benchmarks
python -m pytest -q -ra "$@"
