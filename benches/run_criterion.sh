#!/usr/bin/env bash
# Run the criterion GEMV benchmarks once per kernel tier this CPU supports.
# Usage: benches/run_criterion.sh [extra criterion args, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
tiers="scalar"
grep -qw avx2 /proc/cpuinfo && tiers="$tiers avx2"
grep -qw avx512f /proc/cpuinfo && tiers="$tiers avx512"
for t in $tiers; do
  echo "== tier $t"
  SPARSELM_KERNEL=$t cargo bench -p sparselm-core --bench gemv -- "$@"
done
