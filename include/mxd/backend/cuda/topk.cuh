// SPDX-License-Identifier: MIT
/// @file backend/cuda/topk.cuh
/// @brief Gate top-k on the GPU: relu(scores + b_gate) (or without relu) and the k best per row
/// by radix select.
///
/// One block per row. A float's IEEE bit pattern, with the sign bit set for non-negative values
/// and every bit flipped for negative ones, read as an unsigned integer orders like the value
/// (-0 is stored as +0 first), so the k-th largest score is found digit by digit (8 bits a pass,
/// most significant first) from shared-memory histograms, exactly, in at most sizeof(T) passes
/// whatever k is; the passes stop early once the k-th score's digit bin is taken whole. The
/// scores above it and the needed number of scores equal to it (lowest indices first, through
/// a block scan over each thread's contiguous run of the row) are the selection; ranking them
/// under the strict order (value desc, index asc) gives the CPU backend's result, bit for bit.
///
/// Speed: the row's bit patterns stay in shared memory when they fit (one global read and
/// write of the scores per row, instead of one read per pass), and a warp adds its equal
/// digits with one atomic (the top digits of a row's scores fall in a few bins, so per-lane
/// atomics queue on the same shared address).
///
/// A non-finite score (after the bias, before relu) is an error, as on the CPU: the pass that
/// adds the bias lowers a device key to the first one's (row, expert), which the context
/// reports at its next synchronize(). Meanwhile the row's selection stays in range (a NaN
/// is stored as 0), so nothing is read or written out of bounds.
#pragma once

#include <cstdint>

#include <cub/block/block_scan.cuh>

#include "../../config.hpp"

namespace mxd::detail::cu {

template <class T>
struct ordered_bits;
template <>
struct ordered_bits<float> {
  using type = unsigned int;
};
template <>
struct ordered_bits<double> {
  using type = unsigned long long;
};

// A value's bit pattern made to order like the value (for any sign; -0 and NaN excluded),
// and back.
__device__ __forceinline__ unsigned int to_bits(float v) {
  const unsigned int b = __float_as_uint(v);
  return b & 0x80000000u ? ~b : b | 0x80000000u;
}
__device__ __forceinline__ unsigned long long to_bits(double v) {
  const auto b = static_cast<unsigned long long>(__double_as_longlong(v));
  return b & 0x8000000000000000ull ? ~b : b | 0x8000000000000000ull;
}
__device__ __forceinline__ float from_bits(unsigned int b) {
  return __uint_as_float(b & 0x80000000u ? b & 0x7fffffffu : ~b);
}
__device__ __forceinline__ double from_bits(unsigned long long b) {
  return __longlong_as_double(static_cast<long long>(
      b & 0x8000000000000000ull ? b & 0x7fffffffffffffffull : ~b));
}

constexpr int topk_block = 512;

/// Largest k whose candidates are ranked inside the block (O(k^2 / threads) per row); above
/// it the candidates are left in index order for a stable segmented sort by value.
constexpr index_t topk_rank_limit = 1024;

/// scores: [B, N] (biased, and with relu relu'd, in place), b_gate: [1, N], cand_idx,
/// cand_val: [B, k] scratch, idx, val: [B, k] (row-major with leading dimensions ld_i, ld_v).
/// One block per row; with Shared, N ordered bit patterns of dynamic shared memory. With
/// k > topk_rank_limit only the candidates are written (in index order), not idx and val.
/// nonfinite: lowered by atomicMin to row << 32 | expert of each row's first non-finite score,
/// the row counted from row0 (the view's first row in the caller's batch).
template <class T, bool Shared>
__global__ void __launch_bounds__(topk_block)
    gate_topk_kernel(T* scores, index_t ld_s, const T* b_gate, index_t N, index_t k,
                     std::int32_t* cand_idx, T* cand_val, std::int32_t* idx, index_t ld_i, T* val,
                     index_t ld_v, unsigned long long* nonfinite, index_t row0, bool relu) {
  using U = typename ordered_bits<T>::type;
  using Scan = cub::BlockScan<int, topk_block>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned int hist[256];
  __shared__ U shared_prefix;
  __shared__ index_t shared_remaining;
  __shared__ bool shared_whole_bin;
  extern __shared__ __align__(16) unsigned char row_storage[];
  U* row_bits = reinterpret_cast<U*>(row_storage);

  const index_t r = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32;
  T* s = scores + r * ld_s;
  const auto bits_at = [&](index_t i) -> U {
    if constexpr (Shared) return row_bits[i];
    else return to_bits(s[i]);
  };
  bool flagged = false;  // this thread's first non-finite score is its lowest expert
  for (index_t i = tid; i < N; i += topk_block) {
    const T v = s[i] + b_gate[i];
    if (!flagged && !isfinite(v)) {
      flagged = true;
      atomicMin(nonfinite, static_cast<unsigned long long>(row0 + r) << 32 |
                               static_cast<unsigned long long>(i));
    }
    // +0 for -0 and NaN (and with relu for negatives): the bit patterns stay ordered.
    const T kept = v > T(0) || (!relu && v < T(0)) ? v : T(0);
    s[i] = kept;
    if constexpr (Shared) row_bits[i] = to_bits(kept);
  }
  __syncthreads();

  // Radix select: after the pass for `shift`, the patterns p with (p & mask) == prefix hold the
  // k-th largest, and `remaining` of them belong to the top k (all of them once whole_bin).
  U prefix = 0, mask = 0;
  index_t remaining = k;
  for (int shift = static_cast<int>(sizeof(U)) * 8 - 8; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += topk_block) hist[i] = 0;
    __syncthreads();
    for (index_t base = 0; base < N; base += topk_block) {  // uniform: the warp votes together
      const index_t i = base + tid;
      const U b = i < N ? bits_at(i) : U(0);
      const bool counted = i < N && (b & mask) == prefix;
      const unsigned digit = static_cast<unsigned>(b >> shift) & 255u;
      const unsigned voters = __ballot_sync(0xffffffffu, counted);
      if (counted) {
        const unsigned peers = __match_any_sync(voters, digit);
        if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));  // integer: exact
      }
    }
    __syncthreads();
    if (tid == 0) {
      index_t above = 0;
      int d = 255;
      for (; d > 0 && above + hist[d] < remaining; --d) above += hist[d];
      shared_prefix = prefix | (static_cast<U>(d) << shift);
      shared_remaining = remaining - above;
      shared_whole_bin = hist[d] == remaining - above;
    }
    __syncthreads();
    prefix = shared_prefix;
    remaining = shared_remaining;
    mask |= static_cast<U>(255) << shift;
    if (shared_whole_bin) break;
  }

  // Collect, in index order, every pattern above the bin and the first `remaining` in it. Each
  // thread owns a contiguous run (odd in length, so a warp's shared-memory reads fall on
  // distinct banks); a block scan of the runs' counts places them.
  const index_t run = ((N + topk_block - 1) / topk_block) | 1;
  const index_t begin = min(N, tid * run), end = min(N, begin + run);
  int above = 0, equal = 0;
  for (index_t i = begin; i < end; ++i) {
    const U b = bits_at(i) & mask;
    above += b > prefix;
    equal += b == prefix;
  }
  int above_before, equal_before;
  Scan(scan_storage).ExclusiveSum(above, above_before);
  __syncthreads();
  Scan(scan_storage).ExclusiveSum(equal, equal_before);
  T* cv = cand_val + r * k;
  std::int32_t* ci = cand_idx + r * k;
  index_t slot = above_before + min(index_t(equal_before), remaining);
  index_t equal_seen = equal_before;
  for (index_t i = begin; i < end; ++i) {
    const U full = bits_at(i), b = full & mask;
    bool take = b > prefix;
    if (b == prefix) take = equal_seen++ < remaining;
    if (take) {
      cv[slot] = from_bits(full);
      ci[slot] = static_cast<std::int32_t>(i);
      ++slot;
    }
  }
  if (k > topk_rank_limit) return;
  __syncthreads();

  // Rank each candidate under (value desc, index asc): O(k^2 / threads) per row.
  for (index_t c = tid; c < k; c += topk_block) {
    const T v = cv[c];
    const std::int32_t id = ci[c];
    index_t rank = 0;
    for (index_t j = 0; j < k; ++j) {
      const T w = cv[j];
      rank += (w > v) || (w == v && ci[j] < id);
    }
    idx[r * ld_i + rank] = id;
    val[r * ld_v + rank] = v;
  }
}

// offsets[i] = i k for i in [0, B]: the segments of the candidates' rows.
template <class I>
__global__ void row_offsets_kernel(I* offsets, index_t B, index_t k) {
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i <= B;
       i += index_t(gridDim.x) * blockDim.x)
    offsets[i] = static_cast<I>(i * k);
}

// idx[r, j] = sorted_idx[r k + j], val likewise: the sorted selection into strided outputs.
template <class T>
__global__ void scatter_selection_kernel(const std::int32_t* sorted_idx, const T* sorted_val,
                                         index_t B, index_t k, std::int32_t* idx, index_t ld_i,
                                         T* val, index_t ld_v) {
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < B * k;
       e += index_t(gridDim.x) * blockDim.x) {
    const index_t r = e / k, j = e % k;
    idx[r * ld_i + j] = sorted_idx[e];
    val[r * ld_v + j] = sorted_val[e];
  }
}

}  // namespace mxd::detail::cu

