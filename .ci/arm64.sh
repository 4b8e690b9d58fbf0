#!/usr/bin/env bash
# ARM64 (aarch64-unknown-linux-gnu) CI step, called from .ci/run. Cross-builds with Debian's
# rustc (see tools/arm64/ and shared/docs/arm64-toolchain.md) and runs everything under qemu:
#   1. setup: apt packages, `debian-web` toolchain, arm64 CPython in /opt/pyarm64 (idempotent)
#   2. sparselm-core unit tests under QEMU_CPU=cortex-a72 (tier must be "neon") and
#      QEMU_CPU=cortex-a76 (tier must be "neon-dotprod"), asserted by SPARSELM_EXPECT_TIER
#   3. CLI greedy output on tiny seeded checkpoints (f32, bf16, f16 weights; q8_0, q4_0 on load)
#      and the bundled trained plm-tiny: aarch64 under qemu (A72 and A76) must equal x86_64 with
#      SPARSELM_KERNEL=avx2 byte for byte: the NEON tiers are bit-identical to AVX2, A76
#      (neon-dotprod) with the 16-row int8 kernels as AVX2 has them, A72 (neon, no 16-row
#      kernels) against AVX2 with SPARSELM_INTERLEAVE=0 (the GGUF row layout)
#   4. the abi3 aarch64 wheel imported by arm64 CPython under qemu (A76): load, generate (ids and
#      text) and the SHA-256 of prompt logits in 5 dtypes, all equal to the x86_64 package (avx2)
# Non-interactive; prints a summary; exits non-zero if any step failed.
# Env: ARM64_PROFILE (cargo profile of CLI and wheel, default dev-release: no LTO, faster build);
# ARM64_CLIPPY=1 also runs Debian's clippy on the aarch64 build (-D warnings).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CARGO_TERM_COLOR=never PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
TARGET=aarch64-unknown-linux-gnu
PROFILE=${ARM64_PROFILE:-dev-release}
TDIR=${CARGO_TARGET_DIR:-$ROOT/target}
PROFDIR=$PROFILE; [ "$PROFILE" = dev ] && PROFDIR=debug
WORK=$TDIR/arm64-ci            # checkpoints, site folder, logs (kept: warm reruns are faster)
mkdir -p "$WORK"
LOG=$WORK/log; : >"$LOG"
BUNDLED=$ROOT/python/sparselm/models/plm-tiny
start=$(date +%s)
declare -a SUMMARY=()
failed=0

step() { # step NAME COMMAND...: run, time, record PASS/FAIL (output in $LOG, tail on failure)
    local name=$1; shift
    local t0=$(date +%s)
    echo "arm64: $name ..."
    if "$@" >>"$LOG" 2>&1; then
        SUMMARY+=("PASS  $name ($(( $(date +%s) - t0 )) s)")
    else
        SUMMARY+=("FAIL  $name ($(( $(date +%s) - t0 )) s)")
        failed=1
        echo "---- last lines of $LOG ----"; tail -n 40 "$LOG"; echo "----"
    fi
}

finish() {
    echo
    echo "arm64 summary:"
    printf '  %s\n' "${SUMMARY[@]}"
    echo "arm64: finished in $(( $(date +%s) - start )) s (log: $LOG)"
    exit $failed
}

# --- 1. toolchain ------------------------------------------------------------------------------
step "setup (apt, debian-web toolchain, arm64 CPython)" env PYARM64=1 bash tools/arm64/setup.sh
[ $failed = 0 ] || finish
python3 -c "import numpy, tokenizers" 2>/dev/null ||
    python3 -m pip install --quiet "numpy>=1.24" "tokenizers>=0.19,<1" >>"$LOG" 2>&1
command -v maturin >/dev/null || python3 -m pip install --quiet "maturin>=1.7,<2" >>"$LOG" 2>&1

# --- 2. core tests under two CPU models -------------------------------------------------------
core_tests() { # core_tests QEMU_CPU EXPECTED_TIER
    QEMU_CPU=$1 SPARSELM_EXPECT_TIER=$2 SPARSELM_KERNEL= \
        cargo +debian-web test -p sparselm-core --lib --target $TARGET 2>&1 | tee "$WORK/core-$1.out"
    local rc=${PIPESTATUS[0]}
    grep -E "^test result:" "$WORK/core-$1.out" | sed "s/^/[$1 → $2] /" >>"$WORK/counts"
    return "$rc"
}
: >"$WORK/counts"
step "core build (aarch64, test profile)" cargo +debian-web test -p sparselm-core --lib --target $TARGET --no-run
step "core tests, QEMU_CPU=cortex-a72, tier neon" core_tests cortex-a72 neon
step "core tests, QEMU_CPU=cortex-a76, tier neon-dotprod" core_tests cortex-a76 neon-dotprod
# Opt-in: Debian's clippy version moves with rustc-web updates and may bring new lints.
if [ "${ARM64_CLIPPY:-0}" = 1 ]; then
    step "clippy aarch64 (core, cli; -D warnings)" cargo +debian-web clippy -p sparselm-core \
        -p sparselm-cli --all-targets --target $TARGET -- -D warnings
fi

# --- 3. CLI: aarch64 under qemu vs x86_64 ------------------------------------------------------
step "CLI build aarch64 ($PROFILE)" cargo +debian-web build --profile "$PROFILE" -p sparselm-cli --target $TARGET
# The x86_64 CLI: in CI the one tests/run.sh's `cargo test` built from this checkout minutes ago
# (its profile gives the same bits: Rust never contracts or reorders float operations, and the
# kernels are explicit intrinsics), which saves a build of 3-4 minutes; elsewhere a fresh one.
X86_CLI=$TDIR/$PROFDIR/sparselm
if [ "${CI:-}" = true ] && [ -x "$TDIR/debug/sparselm" ]; then
    X86_CLI=$TDIR/debug/sparselm
    SUMMARY+=("REUSE CLI x86_64: $X86_CLI (built by tests/run.sh)")
else
    step "CLI build x86_64 ($PROFILE)" cargo build --profile "$PROFILE" -p sparselm-cli
fi
make_ckpts() {
    for dt in f32 bf16 f16; do
        PYTHONPATH="$ROOT/python" python3 -c \
            "from sparselm.testing import make_tiny_checkpoint as m; m('$WORK/tiny-$dt', seed=0, dtype='$dt')"
    done
}
step "tiny checkpoints (seed 0: f32, bf16, f16)" make_ckpts
cli_equal() {
    local a64=$TDIR/$TARGET/$PROFDIR/sparselm x86=$X86_CLI ok=0
    local specs=(tiny-f32:auto tiny-bf16:auto tiny-f16:auto tiny-f32:q8_0 tiny-f32:q4_0)
    # The bundled trained model (bf16) gives real text, so a flipped token would show.
    [ -f "$BUNDLED/model.safetensors" ] && specs+=(bundled:auto bundled:q8_0 bundled:q4_0)
    for spec in "${specs[@]}"; do
        local ck=${spec%%:*} dt=${spec##*:} dir
        dir=$WORK/$ck; [ "$ck" = bundled ] && dir=$BUNDLED
        for cpu in cortex-a72 cortex-a76; do
            local args=(generate -q --max-new-tokens 32 --temperature 0 --dtype "$dt"
                        "$dir" "It is a truth universally acknowledged")
            # A76 (neon-dotprod) has the 16-row int8 kernels, as AVX2 has; A72 (neon) has not,
            # so the x86-64 run keeps the GGUF row layout for it.
            local inter=1; [ "$cpu" = cortex-a72 ] && inter=0
            QEMU_CPU=$cpu qemu-aarch64 "$a64" "${args[@]}" >"$WORK/a64.txt" || return 1
            SPARSELM_KERNEL=avx2 SPARSELM_INTERLEAVE=$inter "$x86" "${args[@]}" >"$WORK/x86.txt" || return 1
            if cmp -s "$WORK/a64.txt" "$WORK/x86.txt"; then
                echo "equal: $ck --dtype $dt, $cpu vs x86_64 avx2 (interleave $inter): $(head -c 60 "$WORK/a64.txt" | tr '\n' ' ')"
            else
                echo "DIFFERENT: $ck --dtype $dt, $cpu vs x86_64 avx2 (interleave $inter)"
                diff <(cat "$WORK/a64.txt") <(cat "$WORK/x86.txt") | head -5
                ok=1
            fi
        done
    done
    return $ok
}
step "CLI greedy output aarch64 (a72, a76) == x86_64 avx2" cli_equal

# --- 4. wheel in arm64 CPython under qemu ------------------------------------------------------
build_wheel() {
    rm -rf "$WORK/wheels"
    RUSTUP_TOOLCHAIN=debian-web maturin build --profile "$PROFILE" --target $TARGET \
        --out "$WORK/wheels" 2>&1 | grep -vE "^\s*Compiling "
    return "${PIPESTATUS[0]}"
}
step "wheel build aarch64 (abi3, $PROFILE)" build_wheel
# The arm64 CPython's third-party packages, pinned (the versions the x86_64 tests ran with when
# this was last changed; a new release must not change a CI run).
ARM_SITE_PINS=(numpy==2.4.6 tokenizers==0.23.3 jinja2==3.1.6 markupsafe==3.0.3 tqdm==4.70.1)
site_install() {
    local site=$WORK/site plat=(--platform manylinux_2_34_aarch64 --platform manylinux_2_28_aarch64
        --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64
        --platform manylinux2014_aarch64)
    # Third-party deps once (cached in the site folder); our wheel every run.
    if [ ! -d "$site/numpy" ] || [ ! -d "$site/tokenizers" ]; then
        python3 -m pip install --quiet --no-deps --target "$site" "${plat[@]}" --python-version 3.11 \
            --implementation cp --only-binary=:all: "${ARM_SITE_PINS[@]}" || return 1
    fi
    rm -rf "$site"/sparselm "$site"/sparselm-*.dist-info
    python3 -m pip install --quiet --no-deps --target "$site" "${plat[@]}" --python-version 3.11 \
        --implementation cp --only-binary=:all: "$WORK"/wheels/*aarch64.whl
}
step "site folder: wheel + numpy/tokenizers aarch64 wheels" site_install
wheel_generate() {
    # The x86_64 twin: in CI, the package tests/run.sh just installed from this checkout;
    # elsewhere, a wheel built here (an installed sparselm may be stale).
    local pp="" models=(tiny-f32) m ok=0
    [ -f "$BUNDLED/model.safetensors" ] && models+=(bundled)
    if ! { [ "${CI:-}" = true ] && (cd "$WORK" && python3 -c "import sparselm._native") 2>/dev/null; }; then
        rm -rf "$WORK/wheels-x86" "$WORK/site-x86"
        maturin build --profile "$PROFILE" --out "$WORK/wheels-x86" 2>&1 | grep -vE "^\s*Compiling "
        python3 -m pip install --quiet --no-deps --target "$WORK/site-x86" "$WORK"/wheels-x86/*x86_64.whl ||
            return 1
        pp=$WORK/site-x86
    fi
    for m in "${models[@]}"; do
        local arg=$WORK/$m; [ "$m" = bundled ] && arg=bundled   # `bundled`: the model in the wheel
        # Run from $WORK so ./python of the checkout is not on the path.
        (cd "$WORK" && QEMU_CPU=cortex-a76 PYTHONPATH="$WORK/site" \
            qemu-aarch64 -L /opt/pyarm64 /opt/pyarm64/usr/bin/python3.11 \
            "$ROOT/tools/arm64/smoke.py" "$arg" "$WORK/py-a64.npz") >"$WORK/py-a64.json" || return 1
        echo "aarch64 python [$m]: $(cat "$WORK/py-a64.json")"
        grep -q '"tier": "neon-dotprod"' "$WORK/py-a64.json" || { echo "unexpected tier"; return 1; }
        (cd "$WORK" && SPARSELM_KERNEL=avx2 PYTHONPATH="$pp" python3 "$ROOT/tools/arm64/smoke.py" \
            "$arg" "$WORK/py-x86.npz") >"$WORK/py-x86.json" || return 1
        echo "x86_64 python [$m]:  $(cat "$WORK/py-x86.json")"
        python3 - "$WORK" "$m" <<'EOF_PY' || ok=1
import json, sys
import numpy as np
w, model = sys.argv[1:]
a, b = (json.load(open(f"{w}/py-{m}.json")) for m in ("a64", "x86"))
la, lb = np.load(f"{w}/py-a64.npz"), np.load(f"{w}/py-x86.npz")
ok = True
for key in sorted(set(a) - {"machine", "tier"}):
    same = a[key] == b[key]
    ok &= same
    extra = ""
    if key.startswith("logits_") and not same:
        dt = key[len("logits_sha256_"):]
        extra = f" (max |diff| {float(np.max(np.abs(la[dt] - lb[dt]))):.3g})"
    print(f"python [{model}] {key}: aarch64 {'==' if same else '!='} x86_64 avx2{extra}")
sys.exit(0 if ok else 1)
EOF_PY
    done
    return $ok
}
step "wheel import + generate in arm64 CPython (qemu cortex-a76)" wheel_generate

echo; echo "arm64 test counts:"; sed 's/^/  /' "$WORK/counts"
grep -ahE "^(equal|DIFFERENT|python )" "$LOG" | sed 's/^/  /'
finish
