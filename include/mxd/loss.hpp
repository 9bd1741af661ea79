// SPDX-License-Identifier: MIT
/// @file loss.hpp
/// @brief Reconstruction losses with their gradients: the reference "normalized MSE", MSE,
/// SAELens's row-summed MSE, FVU.
///
///     double L = mxd::loss(mxd::Loss::nmse_ref, y, target, dy);   // dy = dL/dy, [B, O]
///
/// Sums are accumulated in double in a fixed order, so float and double callers get
/// deterministic values.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "device.hpp"
#include "tensor.hpp"

namespace mxd {

enum class Loss {
  nmse_ref,  // mean over all elements of (y - t)^2 / ||t_row||_2, the authors' training loss
  mse,       // mean over all elements of (y - t)^2
  sse,       // mean over rows of sum_o (y - t)^2: O times mse, SAELens's "mse_loss"
  fvu,       // sum (y - t)^2 / sum (t - mean_rows t)^2: fraction of variance unexplained
};

inline const char* loss_name(Loss l) {
  switch (l) {
    case Loss::nmse_ref: return "nmse_ref";
    case Loss::mse: return "mse";
    case Loss::sse: return "sse";
    case Loss::fvu: return "fvu";
  }
  return "?";
}

inline Loss parse_loss(const std::string& name) {
  if (name == "nmse_ref" || name == "nmse") return Loss::nmse_ref;
  if (name == "mse") return Loss::mse;
  if (name == "sse") return Loss::sse;
  if (name == "fvu") return Loss::fvu;
  throw Error("loss: unknown name '" + name + "' (expected nmse_ref, mse, sse or fvu)");
}

namespace detail {
// Checks loss()'s arguments on any device and returns the rows the mean is over.
// y, t, dy (or empty): [B, O].
template <class T, class Device>
index_t loss_mean_rows(Loss kind, InView<T, Device> y, InView<T, Device> t, View<T, Device> dy,
                       index_t mean_rows) {
  const index_t B = y.rows, O = y.cols;
  check_shape(t, B, O, "target");
  if (!dy.empty()) check_shape(dy, B, O, "dloss_dy");
  MXD_CHECK(B > 0 && O > 0, "loss: empty batch [", B, ", ", O, "]");
  MXD_CHECK(mean_rows == 0 || (mean_rows >= B && kind != Loss::fvu), "loss: mean over ",
            mean_rows, " rows for a batch of ", B, (kind == Loss::fvu ? " (not with fvu)" : ""));
  return mean_rows > 0 ? mean_rows : B;
}

/// The factor of the summed (weighted) squared errors: 1 / rows for sse, 1 / (rows O) for the
/// others (fvu divides by its variance instead).
inline double loss_scale(Loss kind, index_t rows, index_t O) {
  return kind == Loss::sse ? 1.0 / static_cast<double>(rows)
                           : 1.0 / (static_cast<double>(rows) * static_cast<double>(O));
}

/// dL/dy of one element, e = y - t in double, for the host loss() and the device one
/// (backend/cuda/loss.cuh): nmse_ref 2 e / |t_row| * scale, mse and sse 2 e * scale, fvu
/// 2 e / var, where scale = loss_scale() and var is fvu's denominator sum (t - mean_rows t)^2.
/// row_norm and var are read only by the kinds that use them (the GPU's kernel passes its
/// memory, so it loads nothing else).
MXD_HOST_DEVICE double loss_grad(Loss kind, double e, const double& row_norm, double scale,
                                 const double& var) {
  switch (kind) {
    case Loss::nmse_ref: return 2 * e / row_norm * scale;
    case Loss::mse:
    case Loss::sse: return 2 * e * scale;
    case Loss::fvu: return 2 * e / var;
  }
  return 0;
}

}  // namespace detail

/// Returns the loss of y against target t and, when dy is not empty, writes dL/dy to it.
/// y, t, dy: [B, O] host views. A zero target row makes nmse_ref infinite, as in the reference.
/// `mean_rows` (nmse_ref, mse and sse; default B): the rows the mean is taken over. A process that
/// holds rows of a larger batch passes that batch's size, so its dy and its share of the loss
/// are exactly the single-process ones (the shares then add up to the loss).
template <class T>
double loss(Loss kind, InView<T, cpu> y, InView<T, cpu> t, View<T> dy = {},
            index_t mean_rows = 0) {
  const index_t B = y.rows, O = y.cols, Bm = detail::loss_mean_rows(kind, y, t, dy, mean_rows);
  double total = 0;
  switch (kind) {
    case Loss::nmse_ref: {
      const double scale = detail::loss_scale(kind, Bm, O);
      for (index_t r = 0; r < B; ++r) {
        double tn = 0;
        for (index_t o = 0; o < O; ++o) tn += double(t(r, o)) * double(t(r, o));
        tn = std::sqrt(tn);
        for (index_t o = 0; o < O; ++o) {
          const double e = double(y(r, o)) - double(t(r, o));
          total += e * e / tn;
          if (!dy.empty()) dy(r, o) = static_cast<T>(detail::loss_grad(kind, e, tn, scale, 0));
        }
      }
      return total * scale;
    }
    case Loss::mse:
    case Loss::sse: {
      const double scale = detail::loss_scale(kind, Bm, O);
      for (index_t r = 0; r < B; ++r)
        for (index_t o = 0; o < O; ++o) {
          const double e = double(y(r, o)) - double(t(r, o));
          total += e * e;
          if (!dy.empty()) dy(r, o) = static_cast<T>(detail::loss_grad(kind, e, 0, scale, 0));
        }
      return total * scale;
    }
    case Loss::fvu: {
      std::vector<double> mean(static_cast<std::size_t>(O), 0.0);
      for (index_t r = 0; r < B; ++r)
        for (index_t o = 0; o < O; ++o) mean[o] += double(t(r, o));
      for (auto& m : mean) m /= static_cast<double>(B);
      double var = 0;
      for (index_t r = 0; r < B; ++r)
        for (index_t o = 0; o < O; ++o) {
          const double d = double(t(r, o)) - mean[o], e = double(y(r, o)) - double(t(r, o));
          var += d * d;
          total += e * e;
        }
      if (!dy.empty())
        for (index_t r = 0; r < B; ++r)
          for (index_t o = 0; o < O; ++o)
            dy(r, o) = static_cast<T>(
                detail::loss_grad(kind, double(y(r, o)) - double(t(r, o)), 0, 0, var));
      return total / var;
    }
  }
  throw Error("loss: unknown kind");
}

/// The same, called with the device's context as the CUDA loss (backend/cuda/loss.cuh) is, so
/// that code written over devices (train/step.hpp) calls loss(ctx, ...) on both.
template <class T>
double loss(Context<cpu>&, Loss kind, InView<T, cpu> y, InView<T, cpu> t, View<T> dy = {},
            index_t mean_rows = 0) {
  return loss<T>(kind, y, t, dy, mean_rows);
}

}  // namespace mxd
