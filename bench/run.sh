#!/bin/sh
# bench/run.sh: runs actiond's benchmarks side by side with Bazel 4.2.3's own
# linux-sandbox and prints a Markdown summary table (for BENCHMARKS.md).
# `make bench` calls it. Needs root (actiond executes only as root) and bazel
# (Debian: bazel-bootstrap). Takes ~20-30 minutes on a 2-core machine.
#
#   1. bench/execlatency: trivial-action latency (/bin/true with no inputs,
#      and /bin/cat of one input file), actiond Execute vs linux-sandbox
#      invoked as Bazel does vs fork+exec, with actiond's phase breakdown;
#   2. executor BenchmarkStageInputs: input staging, hardlink and copy,
#      1k/10k/100k files;
#   3. bench/bazelbench: 200 trivial genrules per action (--jobs=1 and
#      default), the stress workspace //:agg cold/warm, remote vs
#      linux-sandbox (and local for reference), and the wide-input build
#      (21 genrules over 45,000 inputs, cold);
#   4. actiondfs: input root setup for 1k/10k/100k files and sequential
#      read of 256 MiB (go test -bench ./fs/), and the compile-heavy build
#      (241 C compiles) with --input-root=fuse vs hardlink (bazelbench).
#
# Environment: BENCH_OUT (results directory; default a new /tmp dir),
# BENCH_N (trivial-action runs, default 300), BENCH_RUNS (Bazel runs per
# measurement, default 3), ACTIOND_BIN (use this actiond instead of building
# ./cmd/actiond), GO (default go), BENCH_ONLY (execlatency, staging, bazel
# or actiondfs).
set -eu
cd "$(dirname "$0")/.."
GO=${GO:-go}
N=${BENCH_N:-300}
RUNS=${BENCH_RUNS:-3}
ONLY=${BENCH_ONLY:-}
OUT=${BENCH_OUT:-$(mktemp -d /tmp/actiond-bench-XXXXXX)}
mkdir -p "$OUT"

if [ "$(id -u)" != 0 ]; then
    echo "bench/run.sh: needs root (actiond executes actions in its sandbox only as root)" >&2
    exit 1
fi
if ! command -v bazel >/dev/null 2>&1; then
    echo "bench/run.sh: bazel not on PATH (Debian: apt-get install bazel-bootstrap)" >&2
    exit 1
fi

if [ -n "${ACTIOND_BIN:-}" ]; then
    cp "$ACTIOND_BIN" "$OUT/actiond"
else
    $GO build -o "$OUT/actiond" ./cmd/actiond
fi
$GO build -o "$OUT/execlatency" ./bench/execlatency
$GO build -o "$OUT/bazelbench" ./bench/bazelbench
echo "bench: results in $OUT; load: $(cat /proc/loadavg)"

if [ -z "$ONLY" ] || [ "$ONLY" = execlatency ]; then
    echo "== trivial action latency"
    "$OUT/execlatency" --actiond "$OUT/actiond" -n "$N" --json "$OUT/execlatency.json" | tee "$OUT/execlatency.txt"
    echo "== the same, reading one input file"
    "$OUT/execlatency" --actiond "$OUT/actiond" -n "$N" -inputs 1 -cmd "/bin/cat in/f0" --json "$OUT/execlatency-1input.json" | tee "$OUT/execlatency-1input.txt"
fi
if [ -z "$ONLY" ] || [ "$ONLY" = staging ]; then
    echo "== input staging"
    $GO test -run '^$' -bench '^BenchmarkStageInputs$' -benchtime 3x -timeout 30m ./executor/ | tee "$OUT/staging.txt"
fi
if [ -z "$ONLY" ] || [ "$ONLY" = bazel ]; then
    echo "== Bazel builds"
    "$OUT/bazelbench" --actiond "$OUT/actiond" --runs "$RUNS" --only genrules,stress,wide --json "$OUT/bazel.json" | tee "$OUT/bazel.txt"
fi
if [ -z "$ONLY" ] || [ "$ONLY" = actiondfs ]; then
    echo "== actiondfs: input root setup and sequential read"
    $GO test -run '^$' -bench '^Benchmark(StageInputs|SequentialRead)$' -benchtime 5x -timeout 30m ./fs/ | tee "$OUT/fs.txt"
    echo "== actiondfs: compile-heavy build, fuse vs hardlink"
    "$OUT/bazelbench" --actiond "$OUT/actiond" --runs "$RUNS" --only compile --json "$OUT/compile.json" | tee "$OUT/compile.txt"
fi

echo
echo "== summary ($(date -u +%Y-%m-%d), $(nproc) cores, load now: $(cut -d' ' -f1-3 /proc/loadavg))"
$GO run ./bench/summary "$OUT" | tee "$OUT/summary.md"
