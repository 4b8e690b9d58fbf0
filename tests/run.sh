#!/usr/bin/env bash
# The project's test command (README.md and .ci/run call exactly this).
# Builds and installs the package with its test extras, then runs the Rust and Python suites.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --upgrade-strategy only-if-needed ".[test]"
cargo test --workspace --exclude sparselm-py
# The core again under the down-projection layout this CPU does not default to (the run above
# took the default from its vendor, which the installed package reports), so the planar
# kernels and plans of both layouts are tested wherever the kernels exist ("none": the CPU has
# no planar kernel, and both layouts' plans run by name).
default_layout=$(cd /tmp && python3 -c "import sparselm; print(sparselm.down_layout())")
case "$default_layout" in
  rows) other_layouts=groups ;;
  groups) other_layouts=rows ;;
  none) other_layouts="groups rows" ;; # no planar kernel here: the plans of both, by name
  *) echo "tests/run.sh: unexpected down layout '$default_layout'" >&2; exit 1 ;;
esac
for layout in $other_layouts; do
  echo "tests/run.sh: core tests under SPARSELM_DOWN_LAYOUT=$layout (default: $default_layout)"
  SPARSELM_DOWN_LAYOUT=$layout cargo test -p sparselm-core --lib
done
# Benchmarks run once with timing disabled so they cannot rot.
python3 -m pytest -q -p no:cacheprovider tests benches/test_speed.py --benchmark-disable "$@"
