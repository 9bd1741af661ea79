#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Step time of `mxd train` at GPT-2 sizes (768 -> 3072 -> 768, 21504 experts, k 32) on one
# machine: one process with 2 threads against 2 processes with 1 thread each, data- and
# expert-parallel, and the bytes each rank sends per step (metrics.json). Only the MxD trains
# (--baseline none); tokens/s counts the training steps alone (not the teacher's data).
#
#   bench/mpi_steps.sh build/examples/mxd [BATCH] [STEPS]
set -eu
mxd=$1 batch=${2:-1024} steps=${3:-10}
work=$(mktemp -d)
gpt2=(--d-in 768 --d-hidden 3072 --d-out 768 --k 32 --baseline none --batch "$batch" --steps "$steps"
      --eval-rows 64 --warmup 100 --checkpoint-every 0 --progress-every 1000)
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
export OMPI_MCA_btl=self,vader
report() {  # report LABEL DIR
  python3 - "$1" "$2/metrics.json" "$batch" <<'PY'
import json, sys
label, path, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = json.load(open(path))
tps = m["models"][0]["tokens_per_s"]
ranks = m.get("parallel", {}).get("ranks", [])
sent = " ".join(f"{r['bytes_sent_per_step']:.0f}" for r in ranks) or "0"
mem = " ".join(f"{r['memory_bytes'] / 2**20:.0f}" for r in ranks) or "-"
rss = " ".join(f"{r['peak_rss_bytes'] / 2**20:.0f}" for r in ranks) or "-"
print(f"| {label} | {batch / tps * 1000:.0f} | {tps:.0f} | {sent} | {mem} | {rss} |")
PY
}
echo "| run | ms/step | tokens/s | bytes sent per step, per rank | MiB per rank (state + workspace) | peak RSS MiB |"
echo "|---|---:|---:|---:|---:|---:|"
# One process through the same code path (nothing to send), so that it reports its memory.
"${mpi[@]}" -n 1 "$mxd" train "${gpt2[@]}" --threads 2 --parallel data --out "$work/p1" >/dev/null
report "P = 1 x 2 threads" "$work/p1"
"${mpi[@]}" -n 2 "$mxd" train "${gpt2[@]}" --threads 1 --parallel data --out "$work/data" >/dev/null
report "P = 2 x 1 thread, --parallel data" "$work/data"
"${mpi[@]}" -n 2 "$mxd" train "${gpt2[@]}" --threads 1 --parallel experts --out "$work/experts" >/dev/null
report "P = 2 x 1 thread, --parallel experts" "$work/experts"
rm -rf "$work"
