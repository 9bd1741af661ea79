#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# One rank's failure ends every rank of `mxd train --parallel` with a clear error, in bounded
# time: a --data file missing on one rank (ranks started in different directories, the same
# relative path), ranks given different configurations, a rank killed mid-step.
#
#   train_failures.sh MXD MPI_FILES WORK MPIEXEC...
set -u
mxd=$1 files=$2 work=$3
shift 3
mpiexec=("$@")
rm -rf "$work" && mkdir -p "$work/a" "$work/b" || exit 2
fail=0
tiny=(--d-in 16 --d-hidden 32 --d-out 16 --experts 300 --expansion 8 --k 4 --batch 64
      --eval-rows 64 --threads 1)
expect() {  # expect NAME STATUS OUT PATTERN COUNT: nonzero status, COUNT lines matching PATTERN
  local name=$1 status=$2 out=$3 pattern=$4 count=$5 n
  n=$(grep -c -- "$pattern" "$out")
  if [ "$status" = 0 ] || [ "$status" = 124 ] || [ "$n" -lt "$count" ]; then
    echo "FAIL: $name: status $status, $n lines matching '$pattern' (want >= $count):"; cat "$out"; fail=1
  else
    echo "$name: status $status, $n ranks reported: $(grep -m1 -- "$pattern" "$out")"
  fi
}
"$files" data "$work/a/acts.safetensors" 500 16 16 1 || exit 2

# The file is in rank 0's directory only.
timeout 60 "${mpiexec[@]}" -n 1 -wdir "$work/a" "$mxd" train "${tiny[@]}" --data acts.safetensors --parallel data --out "$work/o1" : \
                           -n 1 -wdir "$work/b" "$mxd" train "${tiny[@]}" --data acts.safetensors --parallel data --out "$work/o1" \
  >"$work/missing.txt" 2>&1
expect missing_file $? "$work/missing.txt" "mxd: error: rank 1: .*acts.safetensors" 2

# Different --k on rank 1.
timeout 60 "${mpiexec[@]}" -n 1 "$mxd" train "${tiny[@]}" --steps 3 --parallel experts --out "$work/o2" : \
                           -n 1 "$mxd" train "${tiny[@]}" --steps 3 --parallel experts --out "$work/o2" --k 2 \
  >"$work/mismatch.txt" 2>&1
expect mismatched_config $? "$work/mismatch.txt" "mxd: error: rank 1: the command line of mxd train .* differs between ranks" 2

# Rank 1 is killed (SIGKILL) three seconds into a long run: the launcher ends the others,
# which say so.
start=$(date +%s)
timeout 60 "${mpiexec[@]}" -n 3 bash -c \
  'if [ "${OMPI_COMM_WORLD_RANK:-0}" = 1 ]; then (sleep 3; kill -9 $$) & fi; exec "$@"' _ \
  "$mxd" train "${tiny[@]}" --steps 1000000 --parallel experts --out "$work/o3" >"$work/killed.txt" 2>&1
status=$?
expect killed_rank "$status" "$work/killed.txt" "mxd: error: this rank was stopped by the launcher" 1
echo "killed_rank: every rank ended $(( $(date +%s) - start )) s after the start"
[ "$fail" = 0 ] && echo "every failure ended every rank"
exit "$fail"
