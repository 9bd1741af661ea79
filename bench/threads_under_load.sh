#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Training speed with 1 and 2 threads, on an otherwise idle machine and beside two busy
# processes (`yes > /dev/null`, each keeping one core busy), interleaved round by round so
# that every configuration (and every build given) sees the same background. Prints a
# Markdown table of the median wall time of `mxd train --steps STEPS` (the default job,
# shortened) and the load average before and after.
#
#   bench/threads_under_load.sh [STEPS [ROUNDS [MXD...]]]   (defaults: 100 3 build/examples/mxd)
set -euo pipefail
steps=${1:-100}
rounds=${2:-3}
builds=("${@:3}")
[[ ${#builds[@]} -gt 0 ]] || builds=(build/examples/mxd)
for mxd in "${builds[@]}"; do
  [[ -x $mxd ]] || { echo "usage: $0 [STEPS [ROUNDS [MXD...]]]: '$mxd' is not an executable" >&2; exit 1; }
done
work=$(mktemp -d)
hogs=()
stop_hogs() {
  for p in "${hogs[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${hogs[@]}"; do wait "$p" 2>/dev/null || true; done
  hogs=()
}
trap 'stop_hogs; rm -rf "$work"' EXIT

# Seconds of one run (the whole command: training, evaluation, writing).
run_once() {
  local t0 t1
  t0=$(date +%s.%N)
  "$1" train --steps "$steps" --threads "$2" --out "$work/out" --overwrite > /dev/null 2>&1
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}

declare -A times
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for ((r = 0; r < rounds; ++r)); do
  for busy in 0 2; do
    for ((h = 0; h < busy; ++h)); do yes > /dev/null & hogs+=($!); done
    for b in "${!builds[@]}"; do
      for threads in 1 2; do
        s=$(run_once "${builds[$b]}" "$threads")
        times[$b,$busy,$threads]+="$s "
        echo "round $r, ${builds[$b]}, $busy busy, $threads threads: $s s" >&2
      done
    done
    stop_hogs
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
echo "| build | background | --threads 1 (s) | --threads 2 (s) | 2 threads / 1 thread |"
echo "|---|---|---|---|---|"
for b in "${!builds[@]}"; do
  for busy in 0 2; do
    t1=$(echo "${times[$b,$busy,1]}" | median)
    t2=$(echo "${times[$b,$busy,2]}" | median)
    label=$([[ $busy == 0 ]] && echo "none added" || echo "2 x \`yes\` added")
    echo "| ${builds[$b]} | $label | $t1 | $t2 | $(echo "scale=2; $t2 / $t1" | bc) |"
  done
done
