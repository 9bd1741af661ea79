#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# kill -9 during `mxd train`: a run killed at several points (mid-step, mid-checkpoint, early)
# and resumed each time from what it left must end with the same bytes as an uninterrupted
# run; --resume must always find a consistent MxD + baseline pair.
#
#   train_kill.sh MXD WORK_DIR
set -u
mxd=$1 work=$2
rm -rf "$work" && mkdir -p "$work" || exit 2
tiny=(--d-in 8 --d-hidden 32 --d-out 8 --teacher-hidden 32 --k 4 --batch 32 --eval-rows 64
      --warmup 5 --lr 3e-3 --log-every 5 --checkpoint-every 7 --threads 1 --steps 300)
"$mxd" train "${tiny[@]}" --out "$work/straight" >/dev/null || { echo "uninterrupted run failed"; exit 1; }
committed() {  # the step checkpoint.json names, or -1
  local s
  s=$(grep -o '"step": *[0-9]*' "$work/killed/checkpoint.json" 2>/dev/null | grep -o '[0-9]*$')
  echo "${s:--1}"
}
kills=0
# Each run is killed once the committed step reaches a target (polled every 2 ms, so the kill
# lands anywhere in the steps or the commit after it); -1: at once, while starting or loading.
for target in -1 20 21 100 180 250; do
  resume=()
  if [ -f "$work/killed/checkpoint.json" ]; then
    # Both spellings of --resume: the directory, and its mxd.safetensors.
    if (( kills % 2 )); then resume=(--resume "$work/killed"); else resume=(--resume "$work/killed/mxd.safetensors"); fi
  fi
  "$mxd" train "${tiny[@]}" --out "$work/killed" "${resume[@]}" >/dev/null 2>"$work/err.txt" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ "$(committed)" -lt "$target" ]; do sleep 0.002; done
  kill -9 "$pid" 2>/dev/null && kills=$((kills + 1))
  { wait "$pid"; } 2>/dev/null  # no "Killed" notice from the shell
  rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 137 ]; then
    echo "run $kills failed with status $rc:"; cat "$work/err.txt"; exit 1
  fi
  echo "killed once step $target was committed (status $rc): checkpoint.json names step $(committed)"
done
resume=()
[ -f "$work/killed/checkpoint.json" ] && resume=(--resume "$work/killed")
"$mxd" train "${tiny[@]}" --out "$work/killed" "${resume[@]}" >/dev/null || { echo "final resume failed"; exit 1; }
for f in mxd.safetensors topk_transcoder.safetensors; do
  cmp -s "$work/straight/$f" "$work/killed/$f" || { echo "$f after $kills kills differs from the uninterrupted run's"; exit 1; }
done
echo "$kills kills, each resumed: final checkpoints identical to the uninterrupted run's"
[ "$kills" -ge 3 ] || { echo "only $kills runs were killed before finishing: the run is too fast to test"; exit 1; }
