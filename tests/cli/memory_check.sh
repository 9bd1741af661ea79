#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Sizes whose tensors together exceed the memory available are refused before anything is
# allocated: exit status 1, one line "mxd: error: this run needs X of memory (...) but Y is
# available (SOURCE)", at once. MXD_MEMORY_AVAILABLE stands in for the machine's figure
# (deterministic); the last case takes the machine's own MemAvailable or cgroup limit, with
# sizes that need twice the machine's memory although each tensor fits in it.
#
#   memory_check.sh MXD WORK_DIR
set -u
mxd=$1 work=$2
rm -rf "$work" && mkdir -p "$work" || exit 2
fail=0
check() {  # check NAME PATTERN COMMAND...: exit 1 within 5 s, one stderr line matching
  local name=$1 pattern=$2 err rc start=$SECONDS
  shift 2
  err=$(timeout 60 "$@" 2>&1 >/dev/null)
  rc=$?
  if [ "$rc" = 1 ] && [ "$(wc -l <<<"$err")" = 1 ] && grep -qE -- "$pattern" <<<"$err" &&
     [ $((SECONDS - start)) -le 5 ]; then
    echo "ok   $name: $err"
  else
    echo "FAIL $name: exit status $rc after $((SECONDS - start)) s, stderr: $err"
    fail=1
  fi
}
# 12.8 M parameters in E and D: 205 MB with gradients and moments, against 95 MiB.
wide=(--d-in 64 --d-out 64 --d-hidden 100000 --experts 1000 --k 4 --batch 16)
check train_override "^mxd: error: this run needs 2[0-9][0-9] MiB of memory \(.*\) but 95 MiB is available \(MXD_MEMORY_AVAILABLE\)" \
  env MXD_MEMORY_AVAILABLE=100000000 "$mxd" train "${wide[@]}" --steps 1 --eval-rows 64 --out "$work/o1"
check bench_override "^mxd: error: this run needs 2[0-9][0-9] MiB of memory \(.*\) but 95 MiB is available \(MXD_MEMORY_AVAILABLE\)" \
  env MXD_MEMORY_AVAILABLE=100000000 "$mxd" bench "${wide[@]}" --iters 1 --warmup 0
# The same sizes fit in 1 GB.
MXD_MEMORY_AVAILABLE=1000000000 timeout 60 "$mxd" train "${wide[@]}" --steps 1 --eval-rows 64 --out "$work/o2" >/dev/null 2>&1 ||
  { echo "FAIL: the run that fits in 1 GB was refused"; fail=1; }

# The machine's own figure: d_in = d_out = X and d_hidden = 2^20 put 4 MiB x X in each of E
# and D (a quarter of MemTotal), 32 MiB x X with both gradients and moments: twice MemTotal.
total_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
x=$(( total_kib * 1024 * 2 / (32 << 20) + 1 ))
check train_machine "^mxd: error: this run needs [0-9.]+ GiB of memory \(.*\) but [0-9.]+ [GM]iB is available \((MemAvailable|the cgroup's .*)\)" \
  "$mxd" train --d-in "$x" --d-out "$x" --d-hidden 1048576 --experts 100 --k 4 --expansion 1 \
  --teacher-hidden 16 --batch 16 --steps 1 --eval-rows 64 --out "$work/o3"
[ "$fail" = 0 ] && echo "every size beyond the memory available was refused with both figures"
exit "$fail"
