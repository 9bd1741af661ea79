#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# `mxd train` under mpirun equals one process with the same global batch: P = 2, 3 in both
# modes (float64: 1e-10; float32: 1e-4), checkpoints (weights and AdamW state) of the MxD and
# the baseline compared tensor by tensor; the same P twice gives identical files; a run
# resumed from its checkpoint under mpirun ends with the same bytes; --data files too; the
# baseline's --tc-* recipe flags too.
#
#   train_equal.sh MXD MPI_FILES WORK MPIEXEC...
set -u
mxd=$1 files=$2 work=$3
shift 3
mpiexec=("$@")
rm -rf "$work" && mkdir -p "$work" || exit 2
fail=0
# 385 held-out rows: the last batch of 1 row leaves the other ranks none.
tiny=(--d-in 16 --d-hidden 32 --d-out 16 --teacher-hidden 24 --experts 700 --expansion 8 --k 8
      --batch 384 --eval-rows 385 --threads 1 --warmup 2 --lr 3e-3 --checkpoint-every 5)
run() {  # run NAME NP [args...]: NP = 0 is one process without mpirun
  local name=$1 np=$2
  shift 2
  if [ "$np" = 0 ]; then "$mxd" train "${tiny[@]}" "$@" --out "$work/$name" >"$work/$name.txt" 2>&1
  else "${mpiexec[@]}" -n "$np" "$mxd" train "${tiny[@]}" "$@" --out "$work/$name" >"$work/$name.txt" 2>&1
  fi || { echo "FAIL: $name exited with $?:"; cat "$work/$name.txt"; fail=1; }
}
same() {  # same A B TOL: both checkpoints of run A equal run B's
  for m in mxd topk_transcoder; do
    "$files" compare "$work/$1/$m.safetensors" "$work/$2/$m.safetensors" "$3" || fail=1
  done
}
for dtype in f64 f32; do
  tol=1e-10; [ "$dtype" = f32 ] && tol=1e-4
  for steps in 1 10; do
    run "single_${dtype}_$steps" 0 --dtype "$dtype" --steps "$steps"
    for np in 2 3; do
      for mode in data experts; do
        name="${mode}${np}_${dtype}_$steps"
        run "$name" "$np" --dtype "$dtype" --steps "$steps" --parallel "$mode"
        same "$name" "single_${dtype}_$steps" "$tol"
        # The held-out table rank 0 prints is the single process's (same digits).
        diff <(grep -E '^(mxd|topk)' "$work/$name.txt" | awk '{print $1, $2, $3, $4, $5, $6}') \
             <(grep -E '^(mxd|topk)' "$work/single_${dtype}_$steps.txt" | awk '{print $1, $2, $3, $4, $5, $6}') \
          || { echo "FAIL: $name prints another table"; fail=1; }
      done
    done
  done
done
# Same P, same bits; per-rank memory is reported.
run experts3_again 3 --dtype f64 --steps 10 --parallel experts
cmp "$work/experts3_again/mxd.safetensors" "$work/experts3_f64_10/mxd.safetensors" || { echo "FAIL: two P = 3 runs differ"; fail=1; }
grep -q "rank 2 mxd .* B/step .* MiB" "$work/experts3_again.txt" || { echo "FAIL: no per-rank report"; cat "$work/experts3_again.txt"; fail=1; }
# Resume under mpirun: 5 steps, then on to 10 from the checkpoint: the straight run's bytes.
run resumed 3 --dtype f64 --steps 5 --parallel experts
run resumed 3 --dtype f64 --steps 10 --parallel experts --resume "$work/resumed"
cmp "$work/resumed/mxd.safetensors" "$work/experts3_f64_10/mxd.safetensors" || { echo "FAIL: resumed run differs"; fail=1; }
cmp "$work/resumed/topk_transcoder.safetensors" "$work/experts3_f64_10/topk_transcoder.safetensors" || { echo "FAIL: resumed baseline differs"; fail=1; }
# --data: every rank reads its rows of each batch from the files.
"$files" data "$work/acts.safetensors" 3000 16 16 5 || exit 2
run data_single 0 --dtype f64 --steps 6 --data "$work/acts.safetensors"
run data_files2 2 --dtype f64 --steps 6 --data "$work/acts.safetensors" --parallel data
same data_files2 data_single 1e-10
# The baseline's recipe (SAELens's): MSE over the whole batch, tied init, clipping after the
# gradient sum, no warm-up, free decoder rows, and AuxK in SAELens's form with every rank's
# selection and the whole batch's rows; a 40-row dead window (--dead-window overrides the
# form's 1001 batches), so latents die and AuxK acts within 10 steps.
recipe=(--dtype f64 --steps 10 --tc-recipe saelens --dead-window 40)
run recipe_single 0 "${recipe[@]}"
run recipe_data2 2 "${recipe[@]}" --parallel data
run recipe_experts3 3 "${recipe[@]}" --parallel experts
same recipe_data2 recipe_single 1e-10
same recipe_experts3 recipe_single 1e-10
# AuxK for both models under --parallel data.
run aux_single 0 --dtype f64 --steps 10 --aux-k 4 --dead-window 40
run aux_data3 3 --dtype f64 --steps 10 --aux-k 4 --dead-window 40 --parallel data
same aux_data3 aux_single 1e-10
for m in mxd topk_transcoder; do  # dead-unit counts are integers: the same bytes
  cmp "$work/aux_data3/$m.dead.safetensors" "$work/aux_single/$m.dead.safetensors" ||
    { echo "FAIL: $m's dead units under --parallel data differ"; fail=1; }
done
cmp -s "$work/recipe_data2/topk_transcoder.dead.safetensors" "$work/recipe_single/topk_transcoder.dead.safetensors" ||
  { echo "FAIL: the recipe's dead latents under --parallel data differ"; fail=1; }
# Not vacuous: AuxK and the recipe change what trains.
cmp -s "$work/aux_single/mxd.safetensors" "$work/single_f64_10/mxd.safetensors" && { echo "FAIL: --aux-k changed nothing"; fail=1; }
cmp -s "$work/recipe_single/topk_transcoder.safetensors" "$work/single_f64_10/topk_transcoder.safetensors" &&
  { echo "FAIL: --tc-recipe saelens changed nothing"; fail=1; }
[ "$fail" = 0 ] && echo "mpirun runs equal the single process"
exit "$fail"
