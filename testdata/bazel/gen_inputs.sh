#!/bin/sh
# gen_inputs.sh [WORKSPACE]: creates the >= 2,000 source files that //many
# reads, under WORKSPACE/many/inputs (default: this script's directory).
# Deterministic; rerunning replaces the directory with identical content.
# Some files share content (and a few are empty) on purpose: the CAS
# deduplicates them.
set -eu
ws=${1:-$(dirname "$0")}
dir=$ws/many/inputs
rm -rf "$dir"
i=0
for d in $(seq -w 0 31); do
    mkdir -p "$dir/d$d"
    for f in $(seq -w 0 63); do
        if [ $((i % 256)) -eq 255 ]; then
            : > "$dir/d$d/f$f.txt"
        else
            printf 'input %d of the many-inputs action\n' $((i % 1500)) > "$dir/d$d/f$f.txt"
        fi
        i=$((i + 1))
    done
done
mkdir -p "$dir/nested/a/b/c"
printf 'deeply nested input\n' > "$dir/nested/a/b/c/leaf.txt"
