#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# `mxd train --parallel` when a rank is interrupted, fails outside mxd's own errors, or falls
# silent; each case bounds the whole job by a timeout.
#
#   train_ranks.sh CASE MXD WORK MPIEXEC...
#   interrupt: SIGTERM to mpirun, then SIGINT to rank 1 alone: every rank stops at the same
#              step, which is committed; one "mxd: interrupted at step N" line, no error
#   exception: a std::bad_alloc (rank 1 under an address-space limit) and a file system error
#              (rank 1's --resume path is a symlink loop): every rank ends within seconds with
#              an "mxd: error: rank 1: <cause>" line
#   silent:    rank 1 is stopped (SIGSTOP) mid-run with --timeout 3: every rank ends within
#              seconds with an error naming rank 1, and only rank 1
set -u
case=$1 mxd=$(realpath "$2") work=$(realpath -m "$3")
shift 3
mpiexec=("$@")
rm -rf "$work" && mkdir -p "$work" || exit 2
tiny=(--d-in 16 --d-hidden 32 --d-out 16 --experts 300 --expansion 8 --k 4 --batch 64
      --eval-rows 64 --threads 1)
fail=0
bad() { echo "FAIL: $*"; fail=1; }
committed() {  # the step DIR/checkpoint.json names, or -1
  local s
  s=$(grep -o '"step": *[0-9]*' "$1/checkpoint.json" 2>/dev/null | grep -o '[0-9]*$')
  echo "${s:--1}"
}
# Starts `mpirun -n 2 mxd train ARGS...` in the background (pid in $job), each rank's pid in
# $work/pid.R; RANK1_PREFIX (a command) runs rank 1's mxd through it.
launch() {
  local out=$1
  shift
  rm -f "$work"/pid.*
  "${mpiexec[@]}" -n 2 bash -c 'echo $$ >"$0/pid.$OMPI_COMM_WORLD_RANK"
    if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then eval "${RANK1_PREFIX:-}"; fi; exec "$@"' \
    "$work" "$mxd" train "${tiny[@]}" "$@" >"$out" 2>&1 &
  job=$!
}
wait_for() {  # wait_for FILE PATTERN: up to 60 s
  for _ in $(seq 1 6000); do grep -q -- "$2" "$1" 2>/dev/null && return 0; sleep 0.01; done
  return 1
}
# Waits for the job, at most `limit` seconds; sets rc and took (seconds).
finish() {
  local limit=$1 start=$SECONDS
  for _ in $(seq 1 $((limit * 10))); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$job" 2>/dev/null; then
    bad "$2: the job still runs after $limit s"
    for f in "$work"/pid.*; do kill -9 "$(cat "$f")" 2>/dev/null; done
    kill -9 "$job"
  fi
  wait "$job"
  rc=$?
  took=$((SECONDS - start))
}

case $case in
interrupt)
  # The launcher sends SIGTERM, then SIGKILL odls_base_sigkill_timeout seconds later (default
  # 1 s): 3 s here, so that two ranks on busy cores surely finish their step and commit.
  # Progress lines once a second: an aborting mpirun stops reading the ranks' output, and a
  # line every step would fill the pipe and block rank 0 before it gets to the check.
  export OMPI_MCA_odls_base_sigkill_timeout=3
  for how in mpirun rank1; do
    out=$work/$how.txt dir=$work/$how
    launch "$out" --parallel data --steps 1000000 --checkpoint-every 0 --progress-every 1 --out "$dir"
    wait_for "$out" '^step ' || bad "$how: no progress line"
    if [ "$how" = mpirun ]; then kill -TERM "$job"; else kill -INT "$(cat "$work/pid.1")"; fi
    finish 30 "$how"
    n=$(sed -n 's/^mxd: interrupted at step \([0-9]*\); resume with --resume .*$/\1/p' "$out")
    lines=$(grep -c '^mxd: ' "$out")
    [ -n "$n" ] && [ "$lines" = 1 ] || { bad "$how: want one 'mxd: interrupted' line and nothing else from mxd:"; tail -n 20 "$out"; }
    grep -q 'another rank' "$out" && bad "$how: a rank says another failed"
    [ "$(committed "$dir")" = "${n:-x}" ] || bad "$how: checkpoint.json names step $(committed "$dir"), not '$n'"
    # mpirun reports the ranks' status when it did not end the job itself
    [ "$how" = mpirun ] || [ "$rc" = 130 ] || bad "$how: mpirun exit status $rc, want 130"
    echo "$how: mpirun exit $rc after $took s; $(grep '^mxd: ' "$out"); checkpoint at step $(committed "$dir")"
  done
  [ "$fail" = 0 ] && echo "every rank stopped at the same step and committed it"
  ;;
exception)
  # 1. rank 1 cannot allocate its models: an address-space limit well above what starting
  #    the tool and MPI takes (a CUDA build maps cuBLAS, over 1 GB: the smallest of these
  #    limits under which the tool starts, plus 600 MB), below the MxD's parameters, gradients
  #    and moments: 528 bytes per expert at these widths, for 1.5 times the limit.
  for start in 100000 200000 400000 800000 1600000 3200000 6400000; do
    (ulimit -v $start && "$mxd" --help >/dev/null 2>&1) && break
  done
  limit=$((start + 600000))
  out=$work/bad_alloc.txt
  RANK1_PREFIX="ulimit -v $limit" launch "$out" --parallel data --steps 5 \
    --experts $((limit * 1024 / 528 * 3 / 2)) --out "$work/o1"
  finish 60 bad_alloc
  grep -q '^mxd: error: rank 1: out of memory' "$out" || { bad "bad_alloc: no 'mxd: error: rank 1: out of memory' line (status $rc)"; tail -n 20 "$out"; }
  echo "bad_alloc: mpirun exit $rc after $took s: $(grep -m1 '^mxd: error: rank 1' "$out")"
  # 2. rank 1 finds a symlink loop where rank 0 finds the checkpoint to resume from.
  mkdir -p "$work/a" "$work/b"
  "$mxd" train "${tiny[@]}" --steps 2 --out "$work/a/ckpt" >/dev/null 2>&1 || bad "the checkpoint to resume from was not written"
  ln -s loop "$work/b/loop" && ln -s loop/ckpt "$work/b/ckpt"
  out=$work/filesystem.txt
  cd "$work/a" || exit 2  # rank 0 finds ckpt here, rank 1 in b
  RANK1_PREFIX='cd "$0/b"' launch "$out" --parallel data --steps 4 --resume ckpt --out "$work/o2"
  finish 60 filesystem
  grep -q '^mxd: error: rank 1: .*ckpt' "$out" || { bad "filesystem: no 'mxd: error: rank 1: ... ckpt' line (status $rc)"; tail -n 20 "$out"; }
  echo "filesystem: mpirun exit $rc after $took s: $(grep -m1 '^mxd: error: rank 1' "$out")"
  [ "$fail" = 0 ] && echo "every exception ended every rank with its cause"
  ;;
silent)
  out=$work/silent.txt
  launch "$out" --parallel experts --steps 1000000 --progress-every 0 --timeout 3 --out "$work/o3"
  wait_for "$out" '^step 3/' || bad "no progress line"
  kill -STOP "$(cat "$work/pid.1")"
  finish 30 silent
  kill -9 "$(cat "$work/pid.1")" 2>/dev/null
  grep -q '^mxd: error: rank 0: .*no word from rank 1 in [0-9]* s (collective timeout 3 s)' "$out" ||
    { bad "no error naming rank 1 as silent (status $rc)"; tail -n 20 "$out"; }
  [ "$took" -le 15 ] || bad "the job took $took s to end after rank 1 was stopped"
  echo "silent: mpirun exit $rc, $took s after rank 1 was stopped: $(grep -m1 'no word from' "$out")"
  [ "$fail" = 0 ] && echo "the silent rank was named and every rank ended"
  ;;
*)
  echo "unknown case $case"
  exit 2
  ;;
esac
exit "$fail"
