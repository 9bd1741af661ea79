#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# SIGINT and SIGTERM during `mxd train`: the run finishes its step, commits a checkpoint at
# that step, prints "mxd: interrupted at step N; resume with --resume DIR" and exits 130 or
# 143; resumed from there it ends with the bytes of an uninterrupted run. A second signal
# ends the process at once, without a checkpoint.
#
#   train_signals.sh MXD WORK_DIR
set -u
set -m  # job control: background runs do not ignore SIGINT as a script's otherwise do
mxd=$1 work=$2
rm -rf "$work" && mkdir -p "$work" || exit 2
tiny=(--d-in 8 --d-hidden 32 --d-out 8 --teacher-hidden 32 --k 4 --batch 32 --eval-rows 64
      --warmup 5 --lr 3e-3 --threads 1 --checkpoint-every 0 --progress-every 0)
fail=0
bad() { echo "FAIL: $*"; fail=1; }
committed() {  # the step DIR/checkpoint.json names, or -1
  local s
  s=$(grep -o '"step": *[0-9]*' "$1/checkpoint.json" 2>/dev/null | grep -o '[0-9]*$')
  echo "${s:--1}"
}

# One signal after a few steps of a long run.
for sig in INT TERM; do
  dir=$work/$sig
  want=$((128 + $(kill -l "$sig")))
  "$mxd" train "${tiny[@]}" --steps 1000000 --out "$dir" >"$work/$sig.out" 2>"$work/$sig.err" &
  pid=$!
  for _ in $(seq 1 3000); do grep -q '^step 3/' "$work/$sig.err" && break; sleep 0.01; done
  kill -"$sig" "$pid"
  for _ in $(seq 1 1000); do kill -0 "$pid" 2>/dev/null || break; sleep 0.01; done
  kill -9 "$pid" 2>/dev/null && bad "SIG$sig: still running 10 s after the signal"
  wait "$pid"
  rc=$?
  msg=$(grep -v '^step ' "$work/$sig.err")
  n=$(sed -n 's/^mxd: interrupted at step \([0-9]*\); resume with --resume .*$/\1/p' <<<"$msg")
  last=$(grep '^step ' "$work/$sig.err" | tail -n 1 | sed 's|^step \([0-9]*\)/.*|\1|')
  [ "$rc" = "$want" ] || bad "SIG$sig: exit status $rc, want $want"
  [ "$msg" = "mxd: interrupted at step $n; resume with --resume $dir" ] ||
    bad "SIG$sig: stderr besides progress lines is '$msg'"
  [ -n "$n" ] && [ "$n" = "$last" ] || bad "SIG$sig: interrupted at step '$n', the last step done was $last"
  [ "$(committed "$dir")" = "$n" ] || bad "SIG$sig: checkpoint.json names step $(committed "$dir"), not $n"
  echo "SIG$sig: exit $rc, '$msg', checkpoint at step $(committed "$dir")"
done

# The SIGINT run resumed to n + 5 steps against 5 + n uninterrupted steps: the same bytes.
n=$(committed "$work/INT")
if [ "$n" -gt 0 ]; then
  "$mxd" train "${tiny[@]}" --steps $((n + 5)) --out "$work/INT" --resume "$work/INT" >/dev/null 2>&1 ||
    bad "resuming the interrupted run failed"
  "$mxd" train "${tiny[@]}" --steps $((n + 5)) --out "$work/straight" >/dev/null 2>&1 ||
    bad "the uninterrupted run failed"
  for f in mxd.safetensors topk_transcoder.safetensors; do
    cmp -s "$work/INT/$f" "$work/straight/$f" || bad "$f resumed from step $n differs from the uninterrupted run's"
  done
  echo "resumed from step $n to $((n + 5)): checkpoints identical to an uninterrupted run's"
fi

# Two signals at once: SIGINT and SIGTERM sent while the process is stopped are both
# delivered when it continues, before it runs on. The second must end it there and then: by
# its signal, with no message and no checkpoint (the first alone would finish the step).
"$mxd" train "${tiny[@]}" --steps 1000000 --out "$work/twice" >/dev/null 2>"$work/twice.err" &
pid=$!
for _ in $(seq 1 3000); do grep -q '^step 3/' "$work/twice.err" && break; sleep 0.01; done
kill -STOP "$pid"
kill -INT "$pid"
kill -TERM "$pid"
kill -CONT "$pid"
for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.01; done
kill -9 "$pid" 2>/dev/null && bad "two signals: still running 1 s later"
wait "$pid"
rc=$?
msg=$(grep -v '^step ' "$work/twice.err")
[ "$rc" = 130 ] || [ "$rc" = 143 ] || bad "two signals: exit status $rc, want 130 or 143 (killed by the signal)"
[ -z "$msg" ] || bad "two signals: printed '$msg'"
[ -e "$work/twice/checkpoint.json" ] && bad "two signals: a checkpoint was committed"
echo "two signals: exit $rc at once, nothing printed or committed"

[ "$fail" = 0 ] && echo "every signal ended the run as promised"
exit "$fail"
