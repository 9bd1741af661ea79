// SPDX-License-Identifier: MIT
/// @file train/clip.hpp
/// @brief Gradient clipping by global norm, as torch.nn.utils.clip_grad_norm_ does it: when the
/// L2 norm of all gradients together exceeds `max_norm`, every gradient is scaled by
/// max_norm / (norm + 1e-6). SAELens clips its SAEs' gradients at 1 every step.
///
///     double norm = mxd::train::clip_grad_norm(ctx, grads, 1.0);   // any set, either device
///
/// Written over backend<Device>'s sum_squares and scale, for any parameter set (Params, Grads,
/// TranscoderParams) on the context's device. Sums in double in a fixed order, so the result
/// does not depend on the thread count (the GPU's order differs: equal up to rounding).
#pragma once

#include <cmath>

#include "../backend.hpp"
#include "../backend/cpu.hpp"
#include "../error.hpp"

namespace mxd::train {

/// Scales the gradients in `g` in place so that their global L2 norm is at most `max_norm`;
/// returns the norm before clipping. max_norm <= 0 is refused (0 would zero every gradient).
template <class Set, class Device>
double clip_grad_norm(Context<Device>& ctx, Set& g, double max_norm) {
  MXD_CHECK(std::isfinite(max_norm) && max_norm > 0, "clip_grad_norm: max_norm = ", max_norm,
            " must be finite and > 0");
  using be = backend<Device>;
  using T = typename Set::Scalar;
  double sq = 0;
  g.for_each([&](const char*, auto& t) { sq += be::template sum_squares<T>(ctx, t.view()); });
  const double norm = std::sqrt(sq);
  // torch: clip_coef = max_norm / (total_norm + 1e-6), applied only when it is below 1.
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1) g.for_each([&](const char*, auto& t) { be::template scale<T>(ctx, t.view(), coef); });
  return norm;
}

}  // namespace mxd::train
