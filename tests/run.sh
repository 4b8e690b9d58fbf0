#!/usr/bin/env bash
# The project's test command (README.md and .ci/run call exactly this).
# Builds and installs the package with its test extras, then runs the Rust and Python suites.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --upgrade-strategy only-if-needed ".[test]"
cargo test --workspace --exclude sparselm-py
# The core again under each down-projection layout by name (one of the two repeats this CPU's
# default, which the run above took from its vendor), so the planar kernels and plans of both
# are tested wherever the kernels exist.
SPARSELM_DOWN_LAYOUT=groups cargo test -p sparselm-core --lib
SPARSELM_DOWN_LAYOUT=rows cargo test -p sparselm-core --lib
# Benchmarks run once with timing disabled so they cannot rot.
python3 -m pytest -q -p no:cacheprovider tests benches/test_speed.py --benchmark-disable "$@"
