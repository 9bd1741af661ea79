// SPDX-License-Identifier: MIT
/// @file backend/cuda/steering.cuh
/// @brief steer_selection for device selections: the same edits, in the same order, with the
/// same semantics as the host version in steering.hpp (one thread per row).
#pragma once

#include <cstdint>
#include <vector>

#include "../../steering.hpp"
#include "runtime.cuh"

namespace mxd {
namespace detail::cu {

struct DeviceEdit {
  std::int32_t expert;
  std::int32_t op;  // Steering::Op
  double value;
};

// idx, gate, coef: [B, k + E]. See steer_selection in steering.hpp for the semantics.
template <class T>
__global__ void steer_selection_kernel(const DeviceEdit* edits, index_t E, index_t k,
                                       View<std::int32_t, cuda> idx, View<T, cuda> gate,
                                       View<T, cuda> coef) {
  const index_t r = blockIdx.x * index_t(blockDim.x) + threadIdx.x;
  if (r >= idx.rows) return;
  for (index_t j = 0; j < k; ++j) coef(r, j) = gate(r, j);
  for (index_t e = 0; e < E; ++e) {
    const DeviceEdit ed = edits[e];
    idx(r, k + e) = ed.expert;
    gate(r, k + e) = T(0);
    coef(r, k + e) = T(0);
    index_t slot = k + e;
    for (index_t j = 0; j < k + e && slot == k + e; ++j)
      if (idx(r, j) == ed.expert && (j >= k || gate(r, j) > T(0))) slot = j;
    switch (static_cast<Steering::Op>(ed.op)) {
      case Steering::Op::add: coef(r, slot) += static_cast<T>(ed.value); break;
      case Steering::Op::clamp: coef(r, slot) = static_cast<T>(ed.value); gate(r, slot) = T(0); break;
      case Steering::Op::zero: coef(r, slot) = T(0); gate(r, slot) = T(0); break;
    }
  }
}

}  // namespace detail::cu

/// Applies `s` to a device selection; see the host overload in steering.hpp.
/// idx, gate, coef: [B, k + edits] device views.
template <class T>
void steer_selection(Context<cuda>& ctx, const Steering& s, index_t k,
                     View<std::int32_t, cuda> idx, View<T, cuda> gate, View<T, cuda> coef) {
  const index_t E = static_cast<index_t>(s.edits.size());
  if (idx.rows == 0 || E == 0) return;
  std::vector<detail::cu::DeviceEdit> host;
  for (const Steering::Edit& e : s.edits)
    host.push_back({static_cast<std::int32_t>(e.expert), static_cast<std::int32_t>(e.op), e.value});
  auto* edits = static_cast<detail::cu::DeviceEdit*>(ctx.scratch(host.size() * sizeof(host[0])));
  cudaStream_t stream = ctx.stream();
  MXD_CUDA_CHECK(cudaMemcpyAsync(edits, host.data(), host.size() * sizeof(host[0]),
                                 cudaMemcpyHostToDevice, stream));
  constexpr int threads = 128;
  MXD_CUDA_LAUNCH(detail::cu::steer_selection_kernel<T>,
                  unsigned((idx.rows + threads - 1) / threads), threads, stream, edits, E, k, idx,
                  gate, coef);
  ctx.synchronize();  // `host` must outlive the copy
}

}  // namespace mxd
