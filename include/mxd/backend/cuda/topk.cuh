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
/// Speed: the row's bit patterns stay in shared memory when they fit: the scores are read from
/// global memory once (several loads in flight per thread) and never written back; the first
/// digit's histogram is counted while they load. A warp adds its equal digits with one atomic
/// (the top digits of a row's scores fall in a few bins, so per-lane atomics queue on the same
/// shared address); one warp finds each pass's digit with shuffles; the candidates are ranked
/// in shared memory.
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

/// Scores each thread loads at once while reading a row: with one at a time, the two blocks of
/// 512 threads an SM holds at GPT-2's N keep too few bytes in flight to cover HBM's latency.
constexpr int topk_loads = 4;

/// Largest k whose candidates are ranked inside the block (O(k^2 / threads) per row); above
/// it the candidates are left in index order for a stable segmented sort by value.
constexpr index_t topk_rank_limit = 1024;

/// Dynamic shared memory of gate_topk_kernel: the row's N bit patterns (with `row_in_shared`),
/// then the k candidates' values and indices when the block ranks them (k <= topk_rank_limit).
template <class T>
std::size_t topk_shared_bytes(bool row_in_shared, index_t N, index_t k) {
  using U = typename ordered_bits<T>::type;
  return (row_in_shared ? std::size_t(N) * sizeof(U) : 0) +
         (k <= topk_rank_limit ? std::size_t(k) * (sizeof(T) + sizeof(std::int32_t)) : 0);
}

// hist[digit] += 1 for each lane of the warp with `counted`, one atomic per distinct digit
// (integer: exact). Every lane of the warp must call it.
__device__ __forceinline__ void warp_count(unsigned int* hist, bool counted, unsigned digit,
                                           int lane) {
  const unsigned voters = __ballot_sync(0xffffffffu, counted);
  if (counted) {
    const unsigned peers = __match_any_sync(voters, digit);
    if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
  }
}

// Warp 0: the digit d whose bin holds the `remaining`-th largest pattern counting from bin 255,
// and the count above it; the same as the serial scan
//   d = 255; above = 0; while (d > 0 && above + hist[d] < remaining) above += hist[d--];
// in a few shuffles (each lane sums 8 bins; a suffix scan over lanes finds the lane). Writes
// the next prefix, the count still needed from bin d, and whether bin d is taken whole.
template <class U>
__device__ __forceinline__ void select_digit(const unsigned int* hist, unsigned remaining, U prefix,
                                             int shift, int lane, U& next_prefix,
                                             unsigned& next_remaining, bool& whole_bin) {
  unsigned own[8], sum = 0;
#pragma unroll
  for (int m = 0; m < 8; ++m) sum += own[m] = hist[8 * lane + m];
  unsigned suffix = sum;  // bins of this lane and every lane above it
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned t = __shfl_down_sync(0xffffffffu, suffix, off);
    if (lane + off < 32) suffix += t;
  }
  const unsigned holds = __ballot_sync(0xffffffffu, suffix >= remaining);
  const int target = holds ? 31 - __clz(holds) : 0;  // the highest such lane; 0 as the scan
  if (lane != target) return;
  unsigned above = suffix - sum;
  int d = 8 * lane;
  bool found = false;
#pragma unroll
  for (int m = 7; m > 0; --m) {
    if (found) continue;
    if (above + own[m] < remaining) above += own[m];
    else {
      d = 8 * lane + m;
      found = true;
    }
  }
  next_prefix = prefix | (static_cast<U>(d) << shift);
  next_remaining = remaining - above;
  whole_bin = hist[d] == remaining - above;
}

/// scores: [B, N] (with RowInShared only read; without, biased and with relu relu'd in place),
/// b_gate: [1, N], cand_idx, cand_val: [B, k] scratch (for k > topk_rank_limit), idx, val:
/// [B, k] (row-major with leading dimensions ld_i, ld_v). One block per row; dynamic shared
/// memory as topk_shared_bytes says. With k > topk_rank_limit only the candidates are written
/// (in index order), not idx and val.
/// nonfinite: lowered by atomicMin to row << 32 | expert of each row's first non-finite score,
/// the row counted from row0 (the view's first row in the caller's batch).
template <class T, bool RowInShared>
__global__ void __launch_bounds__(topk_block, 2)
    gate_topk_kernel(T* scores, index_t ld_s, const T* b_gate, index_t N, index_t k,
                     std::int32_t* cand_idx, T* cand_val, std::int32_t* idx, index_t ld_i, T* val,
                     index_t ld_v, unsigned long long* nonfinite, index_t row0, bool relu) {
  using U = typename ordered_bits<T>::type;
  constexpr int top = static_cast<int>(sizeof(U)) * 8 - 8;  // shift of the first digit
  using Scan = cub::BlockScan<int, topk_block>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned int hist[256];
  __shared__ U shared_prefix;
  __shared__ unsigned shared_remaining;
  __shared__ bool shared_whole_bin;
  extern __shared__ __align__(16) unsigned char dynamic_storage[];
  U* row_bits = reinterpret_cast<U*>(dynamic_storage);

  const index_t r = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32;
  const bool ranked = k <= topk_rank_limit;
  T* cv = ranked ? reinterpret_cast<T*>(dynamic_storage + (RowInShared ? N * sizeof(U) : 0))
                 : cand_val + r * k;
  std::int32_t* ci = ranked ? reinterpret_cast<std::int32_t*>(cv + k) : cand_idx + r * k;
  T* s = scores + r * ld_s;
  const auto bits_at = [&](index_t i) -> U {
    if constexpr (RowInShared) return row_bits[i];
    else return to_bits(s[i]);
  };

  // Bias, relu and the non-finite check, with the first digit's histogram. Thread tid visits
  // i = tid (mod topk_block) in increasing order: its first non-finite score is its lowest.
  for (int i = tid; i < 256; i += topk_block) hist[i] = 0;
  __syncthreads();
  bool flagged = false;
  for (index_t base = 0; base < N; base += index_t(topk_block) * topk_loads) {  // uniform
    T v[topk_loads];
#pragma unroll
    for (int u = 0; u < topk_loads; ++u) {  // the loads first, all in flight together
      const index_t i = base + u * topk_block + tid;
      v[u] = i < N ? (RowInShared ? __ldcs(s + i) : s[i]) + b_gate[i] : T(0);
    }
#pragma unroll
    for (int u = 0; u < topk_loads; ++u) {
      const index_t i = base + u * topk_block + tid;
      U b = 0;
      if (i < N) {
        if (!flagged && !isfinite(v[u])) {
          flagged = true;
          atomicMin(nonfinite, static_cast<unsigned long long>(row0 + r) << 32 |
                                   static_cast<unsigned long long>(i));
        }
        // +0 for -0 and NaN (and with relu for negatives): the bit patterns stay ordered.
        const T kept = v[u] > T(0) || (!relu && v[u] < T(0)) ? v[u] : T(0);
        b = to_bits(kept);
        if constexpr (RowInShared) row_bits[i] = b;
        else s[i] = kept;
      }
      warp_count(hist, i < N, static_cast<unsigned>(b >> top), lane);
    }
  }

  // Radix select: after the pass for `shift`, the patterns p with (p & mask) == prefix hold the
  // k-th largest, and `remaining` of them belong to the top k (all of them once whole_bin).
  U prefix = 0, mask = 0;
  unsigned remaining = static_cast<unsigned>(k);
  for (int shift = top;; shift -= 8) {
    __syncthreads();  // the histogram of digit `shift` is complete
    if (tid < 32)
      select_digit(hist, remaining, prefix, shift, lane, shared_prefix, shared_remaining,
                   shared_whole_bin);
    __syncthreads();
    prefix = shared_prefix;
    remaining = shared_remaining;
    mask |= static_cast<U>(255) << shift;
    if (shared_whole_bin || shift == 0) break;
    for (int i = tid; i < 256; i += topk_block) hist[i] = 0;
    __syncthreads();
    for (index_t base = 0; base < N; base += topk_block) {  // uniform: the warp votes together
      const index_t i = base + tid;
      const U b = i < N ? bits_at(i) : U(0);
      warp_count(hist, i < N && (b & mask) == prefix,
                 static_cast<unsigned>(b >> (shift - 8)) & 255u, lane);
    }
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
  index_t slot = above_before + min(index_t(equal_before), index_t(remaining));
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
  if (!ranked) return;
  __syncthreads();

  // Rank each candidate under (value desc, index asc): O(k^2 / threads) per row, from shared
  // memory.
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

