#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# What `mxd train` and `mxd eval` promise about the folders and files they touch, one case per
# ctest test (each fails with the tool as it was before the promise was kept):
#
#   lock            a second run on a locked --out is refused, naming the holder's pid; the
#                   lock of a killed run does not outlive it
#   earlier_run     a fresh run into a folder holding an earlier run's checkpoints is refused
#                   (they stay as they were) unless --overwrite or --resume
#   foreign_sets    set_N, set_N.tmp and set_N_kK folders the tool did not write are kept;
#                   an unfinished set its journal names is removed
#   not_regular     a checkpoint.json that is a directory or a FIFO, a FIFO as --data or as
#                   eval's input: one clean error, nothing blocks
#   resume_flags    --resume refuses a layer flag that differs from the checkpoint, naming it,
#                   and reports the model's own k
#   log             log.csv and loss.svg of a resumed run equal an uninterrupted run's (rows
#                   past the resumed step dropped); a killed run has its log.csv
#   eval_in_place   `mxd eval L L` (also through a symbolic or hard link) is refused, L intact
#
#   files.sh MXD WORK_DIR CASE   (eval_in_place: MXD_LAYER=a layer with x, in the environment)
set -u
mxd=$1 work=$2 case=$3
rm -rf "$work" && mkdir -p "$work" || exit 2
tiny=(--d-in 8 --d-hidden 32 --d-out 8 --teacher-hidden 32 --k 4 --batch 32 --eval-rows 256
      --warmup 5 --lr 3e-3 --log-every 5 --threads 1)
fail() { echo "FAIL ($case): $*"; exit 1; }

# expect_error NAME RC STDERR_FILE PATTERN...: exit status 1 and one stderr line besides
# progress lines, "mxd: error: ..." holding every (grep -E) pattern.
expect_error() {
  local name=$1 rc=$2 err=$3
  shift 3
  local msg
  msg=$(grep -v -E '^(k [0-9]+: )?step [0-9]+/[0-9]+ ' "$err")
  [ "$rc" -eq 1 ] || fail "$name: exit status $rc, expected 1: $msg"
  [ "$(printf '%s\n' "$msg" | wc -l)" -eq 1 ] || fail "$name: more than one stderr line: $msg"
  [[ "$msg" == "mxd: error: "* ]] || fail "$name: stderr is not one 'mxd: error:' line: $msg"
  for p in "$@"; do
    printf '%s\n' "$msg" | grep -q -E -- "$p" || fail "$name: the message lacks '$p': $msg"
  done
  echo "ok   $name: $msg"
}

train() { "$mxd" train "${tiny[@]}" "$@"; }

case "$case" in
lock)
  # A run holding --out for as long as the test needs it (no checkpoint before it is killed).
  "$mxd" train "${tiny[@]}" --steps 100000000 --checkpoint-every 0 --progress-every 1000 --out "$work/o" >/dev/null 2>&1 &
  holder=$!
  trap 'kill -9 $holder 2>/dev/null' EXIT
  for _ in $(seq 500); do
    grep -q "pid $holder " "$work/o/.lock" 2>/dev/null && break
    sleep 0.01
  done
  train --steps 5 --out "$work/o" >/dev/null 2>"$work/err1"
  expect_error "second run on a locked --out" $? "$work/err1" "in use" "pid $holder "
  train --steps 5 --out "$work/o" --overwrite >/dev/null 2>"$work/err2"
  expect_error "second run with --overwrite" $? "$work/err2" "in use" "pid $holder "
  kill -0 "$holder" 2>/dev/null || fail "the holder ended during the test"
  kill -9 "$holder"
  { wait "$holder"; } 2>/dev/null
  train --steps 5 --out "$work/o" >/dev/null 2>"$work/err3" || fail "a run after the holder was killed failed: $(cat "$work/err3")"
  echo "ok   the lock ended with the killed holder"
  ;;
earlier_run)
  train --steps 20 --out "$work/o" >/dev/null 2>&1 || fail "first run failed"
  cp -r "$work/o" "$work/before"
  train --steps 20 --seed 1 --out "$work/o" >/dev/null 2>"$work/err"
  expect_error "fresh run into an earlier run's folder" $? "$work/err" "$work/o" "--overwrite" "--resume"
  diff -r -x .lock "$work/before" "$work/o" >/dev/null || fail "the refused run changed the folder"
  train --steps 30 --out "$work/o" --resume "$work/o" >/dev/null 2>"$work/err" || fail "--resume was refused: $(cat "$work/err")"
  train --steps 20 --seed 1 --out "$work/o" --overwrite >/dev/null 2>"$work/err" || fail "--overwrite was refused: $(cat "$work/err")"
  cmp -s "$work/before/mxd.safetensors" "$work/o/mxd.safetensors" && fail "--overwrite left the earlier model"
  [ "$(find "$work/o" -maxdepth 1 -name 'set_*' | wc -l)" -eq 1 ] || fail "--overwrite left $(ls "$work/o")"
  echo "ok   --resume and --overwrite are accepted; --overwrite leaves one set"
  ;;
foreign_sets)
  for d in o/set_0 o/set_1 o/set_7.tmp o/set_2_k4 sweep/set_0_k2 sweep/set_1_k4.tmp; do
    mkdir -p "$work/$d" && echo mine >"$work/$d/keep.txt"
  done
  train --steps 20 --checkpoint-every 5 --out "$work/o" >/dev/null 2>&1 || fail "run failed"
  train --steps 30 --checkpoint-every 5 --out "$work/o" --resume "$work/o" >/dev/null 2>&1 || fail "resumed run failed"
  train --steps 10 --checkpoint-every 5 --k 2,4 --out "$work/sweep" >/dev/null 2>&1 || fail "sweep failed"
  for d in o/set_0 o/set_1 o/set_7.tmp o/set_2_k4 sweep/set_0_k2 sweep/set_1_k4.tmp; do
    [ "$(cat "$work/$d/keep.txt" 2>/dev/null)" = mine ] || fail "$d, not written by mxd, was removed"
  done
  named=$(grep -o '"dir": *"[^"]*"' "$work/o/checkpoint.json" | grep -o 'set_[0-9]*')
  [ -f "$work/o/$named/mxd.safetensors" ] || fail "checkpoint.json names $named, which is incomplete"
  extra=$(find "$work/o" -maxdepth 1 -name 'set_*' ! -name "$named" ! -name set_0 ! -name set_1 \
            ! -name set_7.tmp ! -name set_2_k4)
  [ -z "$extra" ] || fail "sets left besides the committed one: $extra"
  # A commit killed mid-way: the journal names the set it was writing; the next commit removes it.
  mkdir -p "$work/o/set_40" && echo half >"$work/o/set_40/mxd.safetensors"
  printf 'set_40\n%s\n' "$named" >"$work/o/checkpoint.journal"
  train --steps 40 --checkpoint-every 5 --out "$work/o" --resume "$work/o" >/dev/null 2>&1 || fail "resume after a killed commit failed"
  [ -e "$work/o/set_40" ] && fail "the unfinished set the journal names was kept"
  [ "$(cat "$work/o/set_1/keep.txt")" = mine ] || fail "set_1 was removed"
  echo "ok   foreign sets kept, the journal's unfinished set removed"
  ;;
not_regular)
  mkdir -p "$work/dir/checkpoint.json" "$work/fifo" "$work/out_dir/checkpoint.json"
  mkfifo "$work/fifo/checkpoint.json" "$work/data.safetensors"
  timeout 20 "$mxd" train "${tiny[@]}" --steps 5 --resume "$work/dir" --out "$work/o1" >/dev/null 2>"$work/err"
  expect_error "checkpoint.json is a directory" $? "$work/err" "checkpoint.json' is not a regular file \(it is a directory\)"
  timeout 20 "$mxd" train "${tiny[@]}" --steps 5 --resume "$work/fifo" --out "$work/o2" >/dev/null 2>"$work/err"
  expect_error "checkpoint.json is a FIFO" $? "$work/err" "checkpoint.json' is not a regular file \(it is a FIFO\)"
  timeout 20 "$mxd" train --data "$work/data.safetensors" --steps 5 --out "$work/o3" >/dev/null 2>"$work/err"
  expect_error "--data is a FIFO" $? "$work/err" "data.safetensors' is not a regular file \(it is a FIFO\)"
  timeout 20 "$mxd" train "${tiny[@]}" --steps 5 --out "$work/out_dir" >/dev/null 2>"$work/err"
  expect_error "--out holds a checkpoint.json directory" $? "$work/err" "is not a regular file \(it is a directory\)"
  timeout 20 "$mxd" eval "$work/data.safetensors" "$work/y.safetensors" >/dev/null 2>"$work/err"
  expect_error "eval input is a FIFO" $? "$work/err" "is not a regular file \(it is a FIFO\)"
  ;;
resume_flags)
  train --steps 20 --out "$work/o" >/dev/null 2>&1 || fail "first run failed"
  for bad in "--k 2" "--d-hidden 64" "--experts 99" "--activation relu" "--glu" "--expansion 16"; do
    # shellcheck disable=SC2086
    train --steps 30 --out "$work/o" --resume "$work/o" $bad >/dev/null 2>"$work/err"
    expect_error "--resume with $bad" $? "$work/err" "^mxd: error: ${bad%% *} .*conflicts with the checkpoint"
  done
  train --steps 30 --out "$work/o" --resume "$work/o" --k 4 >/dev/null 2>"$work/err" || fail "--resume with the checkpoint's own --k 4 failed: $(cat "$work/err")"
  # No --k: the report shows the model's k (4), not the flag's default (32).
  "$mxd" train --d-in 8 --d-hidden 32 --d-out 8 --teacher-hidden 32 --batch 32 --eval-rows 256 \
      --threads 1 --steps 40 --out "$work/o" --resume "$work/o" >"$work/table" 2>/dev/null || fail "--resume without --k failed"
  grep -q -E '^mxd +[0-9]+ +4 ' "$work/table" || fail "the table does not show k = 4: $(cat "$work/table")"
  [ "$(grep -c '"k": 4' "$work/o/metrics.json")" -eq 2 ] || fail "metrics.json does not hold k = 4 for both models"
  echo "ok   the resumed model's k is reported"
  ;;
log)
  train --steps 40 --checkpoint-every 10 --out "$work/straight" >/dev/null 2>&1 || fail "straight run failed"
  train --steps 20 --checkpoint-every 10 --out "$work/resumed" >/dev/null 2>&1 || fail "first half failed"
  # Rows a killed run logged after its last checkpoint (step 20): the resumed run drops them.
  echo "25,1,1" >>"$work/resumed/log.csv"
  train --steps 40 --checkpoint-every 10 --out "$work/resumed" --resume "$work/resumed" >/dev/null 2>&1 || fail "resumed run failed"
  for f in log.csv loss.svg; do
    cmp -s "$work/straight/$f" "$work/resumed/$f" || fail "the resumed run's $f differs from the uninterrupted run's"
  done
  echo "ok   a resumed run's log.csv and loss.svg equal an uninterrupted run's"
  "$mxd" train "${tiny[@]}" --steps 100000000 --checkpoint-every 10 --progress-every 1000 --out "$work/killed" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1000); do
    [ -f "$work/killed/checkpoint.json" ] && break
    sleep 0.005
  done
  kill -9 "$pid" 2>/dev/null
  { wait "$pid"; } 2>/dev/null
  [ -f "$work/killed/checkpoint.json" ] || fail "the run wrote no checkpoint in 5 s"
  [ "$(wc -l <"$work/killed/log.csv" 2>/dev/null || echo 0)" -ge 3 ] || fail "the killed run's log.csv lacks its rows up to its checkpoint"
  n=$(wc -l <"$work/straight/log.csv")
  cmp -s <(head -n "$n" "$work/killed/log.csv") <(head -n "$(wc -l <"$work/killed/log.csv")" "$work/straight/log.csv") ||
    fail "the killed run's log.csv is not the uninterrupted run's"
  echo "ok   a killed run has log.csv ($(($(wc -l <"$work/killed/log.csv") - 1)) rows)"
  ;;
eval_in_place)
  layer=${MXD_LAYER:?MXD_LAYER: a layer with x}
  cp "$layer" "$work/L.safetensors"
  ln -s "$work/L.safetensors" "$work/link.safetensors"
  ln "$work/L.safetensors" "$work/hard.safetensors"
  cp "$layer" "$work/batch.safetensors"
  "$mxd" eval "$work/L.safetensors" "$work/L.safetensors" >/dev/null 2>"$work/err"
  expect_error "mxd eval L L" $? "$work/err" "L.safetensors" "is also an input"
  "$mxd" eval "$work/L.safetensors" "$work/link.safetensors" >/dev/null 2>"$work/err"
  expect_error "output a symbolic link to the input" $? "$work/err" "is also an input"
  "$mxd" eval "$work/L.safetensors" "$work/hard.safetensors" >/dev/null 2>"$work/err"
  expect_error "output a hard link to the input" $? "$work/err" "is also an input"
  "$mxd" eval "$work/L.safetensors" "$work/batch.safetensors" --batch "$work/batch.safetensors" >/dev/null 2>"$work/err"
  expect_error "output the --batch file" $? "$work/err" "is also an input"
  cmp -s "$layer" "$work/L.safetensors" || fail "the input changed"
  "$mxd" eval "$work/L.safetensors" "$work/y.safetensors" >/dev/null 2>"$work/err" || fail "eval into another file failed: $(cat "$work/err")"
  ;;
*)
  echo "unknown case '$case'"
  exit 2
  ;;
esac
echo "$case: ok"
