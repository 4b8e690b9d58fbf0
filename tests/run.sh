#!/usr/bin/env bash
# The project's test command (README.md and .ci/run call exactly this).
# Builds and installs the package with its test extras, then runs the Rust and Python suites.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --upgrade-strategy only-if-needed ".[test]"
cargo test --workspace --exclude sparselm-py
# Benchmarks run once with timing disabled so they cannot rot.
python3 -m pytest -q -p no:cacheprovider tests benches/test_speed.py --benchmark-disable "$@"
