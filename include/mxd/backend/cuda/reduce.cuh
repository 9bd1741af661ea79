// SPDX-License-Identifier: MIT
/// @file backend/cuda/reduce.cuh
/// @brief Deterministic warp and block sums: a fixed shuffle / shared-memory tree, so the
/// same inputs give the same bits on every run (no atomics on floating point anywhere).
#pragma once

#include <cuda_runtime.h>

#include "../../config.hpp"

namespace mxd::detail::cu {

constexpr int warp_size = 32;

/// Grid-stride launch geometry: enough blocks to fill the GPU, never more than the work needs.
inline unsigned grid_for(index_t n, int block) {
  const index_t blocks = (n + block - 1) / block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks));
}

/// Sum over the 32 lanes of a warp; every lane gets lane 0's result (a butterfly would give
/// each lane its own rounding).
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = warp_size / 2; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  return __shfl_sync(0xffffffffu, v, 0);
}

/// Sum over a block of BLOCK threads (a power of two, at most 1024); thread 0 gets the result.
/// `shared` holds BLOCK values; the block must be converged.
template <int BLOCK, class T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  static_assert((BLOCK & (BLOCK - 1)) == 0 && BLOCK >= warp_size && BLOCK <= 1024,
                "BLOCK must be a power of two in [32, 1024]");
  v = warp_sum(v);
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  constexpr int warps = BLOCK / warp_size;
  v = threadIdx.x < warps ? shared[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // `shared` may be reused right after
  return v;
}

}  // namespace mxd::detail::cu
