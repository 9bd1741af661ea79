// SPDX-License-Identifier: MIT
/// @file train/aux_loss.cuh
/// @brief auxk_ops<cuda>: the element-wise steps of the AuxK loss (train/aux_loss.hpp) on the
/// GPU, so auxk_backward runs on backend<cuda>. Include after <mxd/cuda.cuh>, from a .cu file.
///
/// DeadUnits::record takes host views: copy the forward's topk_idx and topk_val to the host
/// (copy_to_host) before recording a step.
#pragma once

#include <cmath>

#include "../backend/cuda.cuh"
#include "../backend/cuda/loss.cuh"
#include "../backend/cuda/runtime.cuh"
#include "aux_loss.hpp"

namespace mxd {
namespace detail::cu {

// idx[i] = table[idx[i]] over the [B, k] selection (grid-stride). A template (I = int32)
// so that every translation unit may define it.
template <class I>
__global__ void auxk_take_kernel(View<I, cuda> idx, View<const I, cuda> table) {
  const index_t n = idx.rows * idx.cols;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x) {
    I& v = idx(i / idx.cols, i % idx.cols);
    v = table.data[v];
  }
}

// e = target - pred, [B, O] (grid-stride).
template <class T>
__global__ void auxk_residual_kernel(View<const T, cuda> pred, View<const T, cuda> target,
                                     View<T, cuda> e) {
  const index_t n = e.rows * e.cols;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x) {
    const index_t r = i / e.cols, c = i % e.cols;
    e(r, c) = target(r, c) - pred(r, c);
  }
}

}  // namespace detail::cu

namespace train {

template <>
struct auxk_ops<cuda> {
  /// idx[b,j] = table[idx[b,j]]. idx: [B, k], table: [n_dead, 1].
  static void take(Context<cuda>& ctx, View<std::int32_t, cuda> idx,
                   ConstView<std::int32_t, cuda> table) {
    constexpr int block = mxd::detail::cu::block;
    MXD_CUDA_LAUNCH(mxd::detail::cu::auxk_take_kernel<std::int32_t>,
                    mxd::detail::cu::grid_for(idx.size(), block), block, ctx.stream(), idx, table);
  }

  /// As auxk_ops<cpu>::residual_loss: e = target - pred into scratch, then the device loss of
  /// e_hat against e (sums in double, fixed order): FVU (normalized; 0 when the residual has
  /// no variance) or sse (saelens), its gradient scaled by w = cfg.coef * scale. All [B, O]
  /// device views. One process only (as --parallel: the CPU's).
  template <class T>
  static double residual_loss(Context<cuda>& ctx, const AuxK& cfg, double scale,
                              ConstView<T, cuda> pred, ConstView<T, cuda> target,
                              ConstView<T, cuda> e_hat, View<T, cuda> scratch, View<T, cuda> grad,
                              const SumAcross& sum) {
    MXD_CHECK(!sum, "auxk_backward on the GPU: a batch split over processes is not supported");
    constexpr int block = mxd::detail::cu::block;
    cudaStream_t s = ctx.stream();
    MXD_CUDA_LAUNCH(mxd::detail::cu::auxk_residual_kernel<T>,
                    mxd::detail::cu::grid_for(pred.size(), block), block, s, pred, target, scratch);
    const bool saelens = cfg.form == AuxKForm::saelens;
    const double l = loss<T>(ctx, saelens ? Loss::sse : Loss::fvu, e_hat,
                             ConstView<T, cuda>(scratch), grad);
    if (!std::isfinite(l) || l == 0) return 0;  // fvu with var = 0: x / 0
    const double w = cfg.coef * scale;
    MXD_CUDA_LAUNCH(mxd::detail::cu::scale_kernel<T>, mxd::detail::cu::grid_for(grad.size(), block),
                    block, s, grad.data, grad.ld, grad.rows, grad.cols, static_cast<T>(w));
    return w * l;
  }
};

}  // namespace train
}  // namespace mxd
