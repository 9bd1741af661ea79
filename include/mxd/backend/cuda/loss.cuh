// SPDX-License-Identifier: MIT
/// @file backend/cuda/loss.cuh
/// @brief The losses of loss.hpp on device tensors: the same definitions, sums in double in a
/// fixed order (per-row block trees, then one block over the rows), so runs repeat bit for bit.
///
///     double L = mxd::loss(ws.ctx, mxd::Loss::nmse_ref, y, target, dy);  // all device views
#pragma once

#include "../../loss.hpp"
#include "reduce.cuh"
#include "runtime.cuh"

namespace mxd {
namespace detail::cu {

constexpr int loss_block = 256;

// One block per row r: row_tn[r] = |t_r|, row_err[r] = |y_r - t_r|^2 (divided by |t_r| for
// nmse_ref) and, given column means, row_var[r] = |t_r - mean|^2.
template <class T>
__global__ void __launch_bounds__(loss_block)
    loss_rows_kernel(View<const T, cuda> y, View<const T, cuda> t, const double* mean,
                     bool per_row_norm, double* row_tn, double* row_err, double* row_var) {
  __shared__ double shared[loss_block];
  const index_t r = blockIdx.x, O = y.cols;
  double tsq = 0, esq = 0, var = 0;
  for (index_t o = threadIdx.x; o < O; o += loss_block) {
    const double tv = double(t(r, o)), e = double(y(r, o)) - tv;
    tsq += tv * tv;
    esq += e * e;
    if (mean) var += (tv - mean[o]) * (tv - mean[o]);
  }
  tsq = block_sum<loss_block>(tsq, shared);
  esq = block_sum<loss_block>(esq, shared);
  var = block_sum<loss_block>(var, shared);
  if (threadIdx.x == 0) {
    const double tn = sqrt(tsq);
    row_tn[r] = tn;
    row_err[r] = per_row_norm ? esq / tn : esq;
    row_var[r] = var;
  }
}

// mean[o] = column mean of t, summed in row order. t: [B, O].
template <class T>
__global__ void column_mean_kernel(View<const T, cuda> t, double* mean) {
  const index_t o = blockIdx.x * index_t(blockDim.x) + threadIdx.x;
  if (o >= t.cols) return;
  double s = 0;
  for (index_t r = 0; r < t.rows; ++r) s += double(t(r, o));
  mean[o] = s / double(t.rows);
}

// out[0] = sum of row_err, out[1] = sum of row_var: one block, fixed order.
template <class Acc>
__global__ void __launch_bounds__(loss_block)
    loss_total_kernel(const Acc* row_err, const Acc* row_var, index_t B, Acc* out) {
  __shared__ Acc shared[loss_block];
  Acc e = 0, v = 0;
  for (index_t r = threadIdx.x; r < B; r += loss_block) {
    e += row_err[r];
    v += row_var[r];
  }
  e = block_sum<loss_block>(e, shared);
  v = block_sum<loss_block>(v, shared);
  if (threadIdx.x == 0) {
    out[0] = e;
    out[1] = v;
  }
}

// dy = dL/dy for each kind; `totals` is loss_total_kernel's output (fvu divides by out[1]).
template <class T>
__global__ void loss_grad_kernel(Loss kind, View<const T, cuda> y, View<const T, cuda> t,
                                 const double* row_tn, const double* totals, double scale,
                                 View<T, cuda> dy) {
  const index_t O = y.cols, n = y.rows * O;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x) {
    const index_t r = i / O, o = i % O;
    const double e = double(y(r, o)) - double(t(r, o));
    dy(r, o) = static_cast<T>(loss_grad(kind, e, row_tn[r], scale, totals[1]));
  }
}

}  // namespace detail::cu

/// The loss of device y against device target t and, when dy is not empty, dL/dy into dy;
/// the definitions of the host loss() in loss.hpp. Waits for the stream (returns a number).
/// y, t, dy: [B, O] device views; mean_rows as in the host loss().
template <class T>
double loss(Context<cuda>& ctx, Loss kind, InView<T, cuda> y, InView<T, cuda> t,
            View<T, cuda> dy = {}, index_t mean_rows = 0) {
  const index_t B = y.rows, O = y.cols, Bm = detail::loss_mean_rows(kind, y, t, dy, mean_rows);
  const bool fvu = kind == Loss::fvu;
  auto* buf = static_cast<double*>(ctx.scratch((3 * B + O + 2) * sizeof(double)));
  double *row_tn = buf, *row_err = buf + B, *row_var = buf + 2 * B, *mean = buf + 3 * B;
  double* totals = mean + O;
  cudaStream_t s = ctx.stream();
  constexpr int threads = detail::cu::loss_block;
  if (fvu)
    MXD_CUDA_LAUNCH(detail::cu::column_mean_kernel<T>, unsigned((O + threads - 1) / threads),
                    threads, s, t, mean);
  MXD_CUDA_LAUNCH(detail::cu::loss_rows_kernel<T>, unsigned(B), threads, s, y, t,
                  fvu ? mean : nullptr, kind == Loss::nmse_ref, row_tn, row_err, row_var);
  MXD_CUDA_LAUNCH(detail::cu::loss_total_kernel<double>, 1, threads, s, row_err, row_var, B, totals);
  const double scale = detail::loss_scale(kind, Bm, O);
  if (!dy.empty())
    MXD_CUDA_LAUNCH(detail::cu::loss_grad_kernel<T>, detail::cu::grid_for(B * O, threads), threads,
                    s, kind, y, t, row_tn, totals, scale, dy);
  double host[2];
  MXD_CUDA_CHECK(cudaMemcpyAsync(host, totals, sizeof host, cudaMemcpyDeviceToHost, s));
  ctx.synchronize();
  return fvu ? host[0] / host[1] : host[0] * scale;
}

}  // namespace mxd
