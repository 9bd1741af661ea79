#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Runs every hostile input that make_hostile writes through the `mxd` tool, each under an
# address-space limit and a timeout, and checks that it ends cleanly: exit status 1 and
# exactly one stderr line besides training's progress lines, "mxd: error: ..." holding the
# expected part.
#
#   run_hostile.sh MXD MAKE_HOSTILE WORK_DIR [--no-ulimit]
# --no-ulimit: for sanitizer builds, whose shadow memory needs a huge address space (their
# allocator reports any huge allocation instead).
set -u
mxd=$1 make=$2 work=$3
limit_kb=2097152  # 2 GiB of address space: the trial saw 12-23 GB allocations
[ "${4:-}" = "--no-ulimit" ] && limit_kb=unlimited
rm -rf "$work" && mkdir -p "$work" || exit 2
"$make" "$work" || { echo "make_hostile failed"; exit 2; }
failed=0 total=0
while IFS=$'\t' read -r -a fields; do
  name=${fields[0]} expect=${fields[1]}
  args=("${fields[@]:2}")
  args=("${args[@]//@/$work}")
  total=$((total + 1))
  ( ulimit -v "$limit_kb"; exec timeout 20 "$mxd" "${args[@]}" ) >"$work/$name.out" 2>"$work/$name.err"
  rc=$?
  # Progress lines ("step S/N ...", "k K: step S/N ...") are what a run prints before failing.
  grep -v -E '^(k [0-9]+: )?step [0-9]+/[0-9]+ ' "$work/$name.err" >"$work/$name.msg"
  lines=$(wc -l <"$work/$name.msg")
  first=$(head -n 1 "$work/$name.msg")
  problem=""
  if [ "$rc" -ne 1 ]; then
    problem="exit status $rc (124: timeout; 134/139: crash)"
  elif [ "$lines" -ne 1 ]; then
    problem="$lines stderr lines"
  elif [[ "$first" != "mxd: error: "* ]]; then
    problem="stderr does not start with 'mxd: error: '"
  elif ! grep -qF -- "$expect" "$work/$name.msg"; then
    problem="message lacks '$expect'"
  fi
  if [ -n "$problem" ]; then
    failed=$((failed + 1))
    echo "FAIL $name: $problem"
    head -c 2000 "$work/$name.err"
  else
    echo "ok   $name: ${first:0:160}"
  fi
done <"$work/cases.tsv"
echo "$((total - failed)) of $total hostile inputs end in a clean error"
[ "$failed" -eq 0 ] && [ "$total" -gt 0 ]
