#!/bin/bash
# The checks to run on a machine with a real GPU, in one go, with bounded time.
#
# lavapipe (CI) runs every WGSL kernel, but a real GPU differs in ways it cannot show:
# the hardware plan (splits, tile rows), unchecked shaders, tuned tile shapes, drivers
# that race (stop 19 found one: docs/GPU_KERNELS.md, "Measured on an NVIDIA H200").
# This runs the GPU test binaries with ORACLEFLOW_REQUIRE_GPU=1, tests/extremes.rs alone
# with one thread and a short GPU wait limit (it did not finish on an H200; this shows
# where it waits), `bench --peers` with the gpu first, and a 50-step Heun trajectory on
# the gpu and the cpu, pruned and dense, comparing the samples byte for byte.
#
# Usage: scripts/real_gpu_check.sh OUT_DIR [BIN_DIR]
#   BIN_DIR: prebuilt test binaries named gpu_backend, oracle_backends, gpu_prune,
#   backend_suite, stream, extremes, shaders_validate, and the oracleflow binary (for a
#   machine without cargo; build them with `cargo test --release --no-run` and strip
#   the hashes off their names). Without BIN_DIR the tests run through cargo.
# Needs Fashion-MNIST (ORACLEFLOW_FASHION_MNIST_DIR or dataset-fashion-mnist) and
# python3 with numpy (torch too, for the CUDA peers).
set -u
OUT="${1:?usage: scripts/real_gpu_check.sh OUT_DIR [BIN_DIR]}"
BIN="${2:-}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -n "$BIN" ]; then BIN="$(cd "$BIN" && pwd)"; fi
cd "$(dirname "$0")/.."
LOG="$OUT/log.txt"
T0=$(date +%s)
say() { echo "=== +$(($(date +%s) - T0))s $*" | tee -a "$LOG"; }
export ORACLEFLOW_REQUIRE_GPU=1 XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

test_binary() { # NAME [ARGS...]
    local name=$1
    shift
    if [ -n "$BIN" ]; then
        timeout 120 "$BIN/$name" "$@"
    else
        timeout 600 cargo test --release --test "$name" -- "$@"
    fi
}
if [ -n "$BIN" ]; then OF="$BIN/oracleflow"; else
    cargo build --release && OF=target/release/oracleflow
fi

say info
"$OF" info --data fashion-mnist >>"$LOG" 2>&1
for t in shaders_validate gpu_backend oracle_backends gpu_prune backend_suite stream; do
    say "test $t"
    test_binary "$t" >>"$LOG" 2>&1
    echo "rc $t $?" | tee -a "$LOG"
done
say "test extremes, one thread, GPU waits of at most 10 s"
ORACLEFLOW_GPU_TIMEOUT_S=10 test_binary extremes --test-threads=1 --nocapture >>"$LOG" 2>&1
echo "rc extremes $?" | tee -a "$LOG"

say bench
timeout 300 "$OF" bench --data fashion-mnist --backends gpu,cpu --reps 5 --peers \
    --peers-dir benches/peers --json "$OUT/bench.json" --force >>"$LOG" 2>&1
echo "rc bench $?" | tee -a "$LOG"

for run in "gpu gp" "gpu gd --exact-dense" "cpu cp" "cpu cd --exact-dense"; do
    set -- $run
    say "sample $2"
    timeout 300 "$OF" sample --data fashion-mnist -n 256 --batch 256 --steps 50 \
        --solver heun --seed 3 --backend "$1" --out "$OUT/$2" --force ${3:-} >>"$LOG" 2>&1
    echo "rc sample $2 $?" | tee -a "$LOG"
done
for other in gd cp cd; do
    if cmp -s "$OUT/gp/samples.npy" "$OUT/$other/samples.npy"; then
        echo "samples: gp == $other" | tee -a "$LOG"
    else
        echo "samples: gp != $other" | tee -a "$LOG"
    fi
done
say done
