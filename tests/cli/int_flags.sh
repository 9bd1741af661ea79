#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Integer flags are range-checked on their 64-bit value before any narrowing: each case ends
# in exit status 1 with exactly one stderr line, "mxd: error: --FLAG = VALUE is out of range"
# (not a crash, not a wrapped value that runs, not an overflowed shape).
#
#   int_flags.sh MXD
set -u
mxd=$1
layer=(--d-in 32 --d-hidden 64 --d-out 32 --experts 128 --k 4 --batch 16)
fail=0
check() {  # check FLAG VALUE COMMAND...
  local flag=$1 value=$2 err rc
  shift 2
  err=$(timeout 20 "$mxd" "$@" 2>&1 >/dev/null)
  rc=$?
  if [ "$rc" = 1 ] && [ "$(wc -l <<<"$err")" = 1 ] &&
     [[ "$err" == "mxd: error: --$flag = $value is out of range ["* ]]; then
    echo "ok   --$flag $value: $err"
  else
    echo "FAIL --$flag $value: exit status $rc, stderr: $err"
    fail=1
  fi
}
check iters 2147483648 bench "${layer[@]}" --iters 2147483648          # was a crash (int -2^31)
check warmup 4294967297 bench "${layer[@]}" --iters 1 --warmup 4294967297  # was 1 warm-up
check tile-rows 9223372036854775800 bench "${layer[@]}" --iters 1 --tile-rows 9223372036854775800
check iters 99999999999999999999 bench "${layer[@]}" --iters 99999999999999999999  # beyond 64 bits
check seed -1 train --steps 1 --seed -1
check d-hidden 4611686018427387904 train --steps 1 --d-hidden 4611686018427387904
[ "$fail" = 0 ] && echo "every out-of-range integer flag was refused by name"
exit "$fail"
