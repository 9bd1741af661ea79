// SPDX-License-Identifier: MIT
/// @file train/clip.hpp
/// @brief Gradient clipping by global norm, as torch.nn.utils.clip_grad_norm_ does it: when the
/// L2 norm of all gradients together exceeds `max_norm`, every gradient is scaled by
/// max_norm / (norm + 1e-6). SAELens clips its SAEs' gradients at 1 every step.
///
///     double norm = mxd::train::clip_grad_norm(grads, 1.0);   // host memory; any parameter set
///
/// Works over any set with for_each(f(name, Tensor&)) on host memory (Params, Grads,
/// TranscoderParams). Sums in double, so the result does not depend on the thread count.
#pragma once

#include <cmath>
#include <type_traits>

#include "../error.hpp"

namespace mxd::train {

/// Scales the gradients in `g` in place so that their global L2 norm is at most `max_norm`;
/// returns the norm before clipping. max_norm <= 0 is refused (0 would zero every gradient).
template <class Set>
double clip_grad_norm(Set& g, double max_norm) {
  MXD_CHECK(std::isfinite(max_norm) && max_norm > 0, "clip_grad_norm: max_norm = ", max_norm,
            " must be finite and > 0");
  double sq = 0;
  g.for_each([&](const char*, auto& t) {
    for (decltype(t.size()) i = 0; i < t.size(); ++i) sq += double(t[i]) * double(t[i]);
  });
  const double norm = std::sqrt(sq);
  // torch: clip_coef = max_norm / (total_norm + 1e-6), applied only when it is below 1.
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1) {
    g.for_each([&](const char*, auto& t) {
      using V = std::remove_reference_t<decltype(t[0])>;
      for (decltype(t.size()) i = 0; i < t.size(); ++i) t[i] = static_cast<V>(double(t[i]) * coef);
    });
  }
  return norm;
}

}  // namespace mxd::train
