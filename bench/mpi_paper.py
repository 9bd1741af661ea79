#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""On-paper scaling of `mxd train --parallel`: memory per rank and communication time per
step, from the byte counts of include/mxd/parallel/ (the formulas below are what the
Communicator's bytes_sent counts; bench/mpi_steps.sh measures them) and interconnect
bandwidths (bench/RESULTS.md cites them).

    python3 bench/mpi_paper.py [--batch 4096] [--k 32]

Per rank r of P, global batch B (B_r = B / P rows), k, widths I, H, O, S bytes per value
(4: float32), dense parameters n_d = I H + H + H O + O, expert parameters N (I + O + 1):

  data parallel:    sent = 2 (P-1)/P (n_d + N (I + O + 1)) S          (gradient all-reduce)
  expert parallel:  sent = (P-1)/P B [(I + 2 O) S + 2 k (S + 4)]      (x, v, dv, selections)
                         + 2 (P-1)/P n_d S                             (dense gradients)

Memory per rank: parameters, gradients and two AdamW moments (4 S per parameter) of the
rank's share, plus the gate scores (data: B_r N values; experts: B N / P) and the dense
activations of B_r rows (hpre, z, dz, dhpre: 4 H; u, v, du, dv, y, dy: 6 O per row).
"""
import argparse

SIZES = {"GPT-2 (768-3072-768)": (768, 3072, 768), "4096-wide (4096-16384-4096)": (4096, 16384, 4096)}
EXPERTS = [21504, 262144, 1 << 20, 1 << 22]
RANKS = [1, 8, 64]
# Per-rank bandwidth, one direction, GB/s: nccl-tests bus bandwidth of 8 H100 SXM on NVLink 4
# (460-480 GB/s), and an NDR InfiniBand port per GPU (400 Gb/s, about 48 GB/s effective).
LINKS = {"NVLink 4": 470e9, "IB NDR": 48e9}


def dense_params(I, H, O):
    return I * H + H + H * O + O


def bytes_sent(mode, P, B, k, I, H, O, N, S=4):
    if P == 1:
        return 0.0
    f = (P - 1) / P
    nd = dense_params(I, H, O)
    if mode == "data":
        return 2 * f * (nd + N * (I + O + 1)) * S
    return f * B * ((I + 2 * O) * S + 2 * k * (S + 4)) + 2 * f * nd * S


def memory(mode, P, B, k, I, H, O, N, S=4):
    nd, ne = dense_params(I, H, O), N * (I + O + 1)
    Br = B / P
    state = 4 * S * (nd + (ne if mode == "data" else ne / P))
    scores = (Br * N if mode == "data" else B * N / P) * S
    dense_act = Br * (4 * H + 6 * O) * S
    gathered = 0 if mode == "data" else B * (I + 4 * O) * S  # X, partial v, dv of all rows
    return state + scores + dense_act + gathered


def human(b):
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b / 1e3:.3g} kB"


def ms(b, bw):
    return f"{b / bw * 1e3:.3g}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    a = ap.parse_args()
    B, k = a.batch, a.k
    for name, (I, H, O) in SIZES.items():
        print(f"\n{name}, batch {B}, k {k}, float32 (per rank; ms per step at "
              + ", ".join(LINKS) + ")\n")
        print("| N | P | data: memory | data: sent | data: ms | experts: memory | experts: sent | experts: ms |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for N in EXPERTS:
            for P in RANKS:
                row = [f"{N:,}", str(P)]
                for mode in ("data", "experts"):
                    s = bytes_sent(mode, P, B, k, I, H, O, N)
                    row += [human(memory(mode, P, B, k, I, H, O, N)), human(s) if s else "0",
                            " / ".join(ms(s, bw) for bw in LINKS.values()) if s else "0"]
                print("| " + " | ".join(row) + " |")
        # Expert parallelism sends fewer bytes once N (I + O + 1) outweighs the activations.
        f = lambda N: bytes_sent("data", 8, B, k, I, H, O, N) - bytes_sent("experts", 8, B, k, I, H, O, N)
        lo, hi = 1, 1 << 30
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if f(mid) < 0 else (lo, mid)
        print(f"\nexpert parallelism sends fewer bytes than data parallelism from N = {lo:,} experts")


if __name__ == "__main__":
    main()
