#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# `mxd train` on a full disk: a tmpfs with every amount of free space a short run can meet
# (0 to more than it needs, one page at a time), then with every small number of free inodes.
#
#   files    every file the run leaves is complete: log.csv a prefix of the uninterrupted
#            run's (at least its header), metrics.json, loss.svg and the checkpoints whole
#            (never 0 bytes), no FILE.tmp; a run that succeeds wrote them all
#   errors   a run that fails ends in one `mxd: error:` line naming the errno's text, never
#            the --lr hint; a failed checkpoint says so ("training stopped at step N", "room
#            for two sets"), and leaves no unfinished set behind
#
#   disk_full.sh MXD WORK_DIR files|errors
# Needs root (mount); exits 77 (skipped) where no tmpfs can be mounted.
set -u
mxd=$1 work=$2 mode=$3
mnt=$work/mnt
umount "$mnt" 2>/dev/null
rm -rf "$work" && mkdir -p "$mnt" || exit 2
mount -t tmpfs -o size=1m tmpfs "$mnt" 2>/dev/null || { echo "SKIP: cannot mount a tmpfs (needs root)"; exit 77; }
trap 'umount "$mnt" 2>/dev/null' EXIT
# files: one checkpoint, at the end, so that what follows it can find the disk full; errors:
# two, so that the second needs room for both sets.
every=10
[ "$mode" = files ] && every=0
args=(--d-in 8 --d-hidden 32 --d-out 8 --teacher-hidden 32 --k 4 --batch 32 --eval-rows 64
      --warmup 5 --lr 3e-3 --log-every 5 --threads 1 --progress-every 1000 --checkpoint-every "$every")
# The uninterrupted run, and its checkpoint of step 10 (a run of 10 steps ends with it).
"$mxd" train "${args[@]}" --steps 20 --out "$work/ref" >/dev/null 2>&1 || { echo "reference run failed"; exit 2; }
"$mxd" train "${args[@]}" --steps 10 --out "$work/ref10" >/dev/null 2>&1 || { echo "reference run failed"; exit 2; }
failures=0 runs=0 refused=0
fail() { echo "FAIL ($1): $2"; failures=$((failures + 1)); }

# check WHAT: runs the job into $mnt/o and checks what it left against the mode's promise.
check() {
  local what=$1 o=$mnt/o
  rm -rf "$o"
  "$mxd" train "${args[@]}" --steps 20 --out "$o" >/dev/null 2>"$work/err"
  local rc=$?
  runs=$((runs + 1))
  local msg
  msg=$(grep -v -E '^step [0-9]+/[0-9]+ ' "$work/err")
  [ "$rc" -ne 0 ] && refused=$((refused + 1))
  if [ "$mode" = files ]; then
    if [ -e "$o/log.csv" ]; then
      [ -s "$o/log.csv" ] || fail "$what" "log.csv is empty"
      cmp -s "$o/log.csv" <(head -c "$(stat -c %s "$o/log.csv")" "$work/ref/log.csv") ||
        fail "$what" "log.csv is not a prefix of the uninterrupted run's"
    fi
    if [ -e "$o/metrics.json" ]; then
      [ "$(tail -n 1 "$o/metrics.json")" = "}" ] && grep -q '"topk_transcoder"' "$o/metrics.json" ||
        fail "$what" "metrics.json is incomplete ($(stat -c %s "$o/metrics.json") bytes)"
    fi
    [ -e "$o/loss.svg" ] && { cmp -s "$o/loss.svg" "$work/ref/loss.svg" || fail "$what" "loss.svg is incomplete"; }
    for f in mxd.safetensors topk_transcoder.safetensors; do
      [ -e "$o/$f" ] || continue
      cmp -s "$o/$f" "$work/ref/$f" || cmp -s "$o/$f" "$work/ref10/$f" || fail "$what" "$f is incomplete"
    done
    local tmp
    tmp=$(find "$o" -type f -name '*.tmp' 2>/dev/null)
    [ -z "$tmp" ] || fail "$what" "left $tmp"
    if [ "$rc" -eq 0 ]; then
      for f in log.csv metrics.json loss.svg mxd.safetensors topk_transcoder.safetensors; do
        [ -e "$o/$f" ] || fail "$what" "the run succeeded without writing $f"
      done
    fi
  elif [ "$rc" -ne 0 ]; then
    if [ "$rc" -ne 1 ] || [ "$(printf '%s\n' "$msg" | wc -l)" -ne 1 ] || [[ "$msg" != "mxd: error: "* ]]; then
      fail "$what" "exit status $rc, stderr: $msg"
    elif [[ "$msg" != *"No space left on device"* ]]; then
      fail "$what" "the message lacks the errno's text: $msg"
    elif [[ "$msg" == *"--lr"* ]]; then
      fail "$what" "the message blames the learning rate: $msg"
    elif [[ "$msg" == *checkpoint* || "$msg" == *set_* ]] &&
         [[ "$msg" != *"training stopped at step"*"room for two sets"* ]]; then
      fail "$what" "a failed checkpoint does not say so: $msg"
    fi
    local named="" stray
    [ -f "$o/checkpoint.json" ] && named=$(grep -o '"dir": *"[^"]*"' "$o/checkpoint.json" | grep -o 'set_[0-9]*')
    stray=$(find "$o" -maxdepth 1 -name 'set_*' ! -name "${named:-none}" 2>/dev/null)
    [ -z "$stray" ] || fail "$what" "left the unfinished set $stray: $msg"
  fi
}

bs=$(stat -f -c %S "$mnt")
need=$(du -sb "$work/ref" | cut -f1)
for ((free = 0; free <= 2 * need + 16 * bs; free += bs)); do
  rm -f "$mnt/filler"
  avail=$(( $(stat -f -c %a "$mnt") * bs ))
  [ "$avail" -gt "$free" ] && fallocate -l $((avail - free)) "$mnt/filler"
  check "$free bytes free"
done
rm -f "$mnt/filler"
# Free inodes instead of bytes (the tmpfs root takes one).
for ((inodes = 2; inodes <= 24; ++inodes)); do
  umount "$mnt" && mount -t tmpfs -o "size=64m,nr_inodes=$inodes" tmpfs "$mnt" || exit 2
  check "$inodes inodes"
done
echo "$runs runs on a full disk, $refused ended in an error: $failures failures ($mode)"
[ "$failures" -eq 0 ] && [ "$refused" -gt 0 ] && [ "$refused" -lt "$runs" ]
