// SPDX-License-Identifier: MIT
/// @file backend/cuda/steering.cuh
/// @brief steer_selection for device selections: the host version's row body
/// (detail::steer_row in steering.hpp) run by one thread per row.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../../steering.hpp"
#include "runtime.cuh"

namespace mxd {
namespace detail::cu {

// The edits are copied to the device as they are.
static_assert(std::is_trivially_copyable_v<Steering::Edit>, "Steering::Edit is copied bytewise");

// One thread per row; see detail::steer_row in steering.hpp. idx, gate, coef: [B, k + E].
template <class T>
__global__ void steer_selection_kernel(const Steering::Edit* edits, index_t E, index_t k,
                                       View<std::int32_t, cuda> idx, View<T, cuda> gate,
                                       View<T, cuda> coef) {
  const index_t r = blockIdx.x * index_t(blockDim.x) + threadIdx.x;
  if (r >= idx.rows) return;
  steer_row(edits, E, k, idx.row(r), gate.row(r), coef.row(r));
}

}  // namespace detail::cu

/// Applies `s` to a device selection; see the host overload in steering.hpp.
/// idx, gate, coef: [B, k + edits] device views.
template <class T>
void steer_selection(Context<cuda>& ctx, const Steering& s, index_t k,
                     View<std::int32_t, cuda> idx, View<T, cuda> gate, View<T, cuda> coef) {
  const index_t E = static_cast<index_t>(s.edits.size());
  if (idx.rows == 0 || E == 0) return;
  const std::size_t bytes = s.edits.size() * sizeof(Steering::Edit);
  auto* edits = static_cast<Steering::Edit*>(ctx.scratch(bytes));
  cudaStream_t stream = ctx.stream();
  MXD_CUDA_CHECK(cudaMemcpyAsync(edits, s.edits.data(), bytes, cudaMemcpyHostToDevice, stream));
  constexpr int threads = 128;
  MXD_CUDA_LAUNCH(detail::cu::steer_selection_kernel<T>,
                  unsigned((idx.rows + threads - 1) / threads), threads, stream, edits, E, k, idx,
                  gate, coef);
  ctx.synchronize();  // s.edits must outlive the copy
}

}  // namespace mxd
