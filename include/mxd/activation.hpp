// SPDX-License-Identifier: MIT
/// @file activation.hpp
/// @brief The encoder activations and their derivatives, per element, for host and device code.
#pragma once

#include <cmath>

#include "config.hpp"
#include "device.hpp"

namespace mxd {

/// act(h) for the given activation.
template <class T>
MXD_HOST_DEVICE T activate(Activation a, T h) {
  using std::erf; using std::exp; using std::tanh; using std::sqrt;
  const T one(1), half(0.5);
  switch (a) {
    case Activation::relu: return h > T(0) ? h : T(0);
    case Activation::gelu: return half * h * (one + erf(h * T(0.70710678118654752440)));
    case Activation::gelu_tanh: {
      const T c = T(0.79788456080286535588);  // sqrt(2 / pi)
      return half * h * (one + tanh(c * (h + T(0.044715) * h * h * h)));
    }
    case Activation::sigmoid: return one / (one + exp(-h));
    case Activation::silu: return h / (one + exp(-h));
  }
  return h;
}

/// d act(h) / dh. relu'(0) = 0, as in PyTorch.
template <class T>
MXD_HOST_DEVICE T activate_grad(Activation a, T h) {
  using std::erf; using std::exp; using std::tanh;
  const T one(1), half(0.5);
  switch (a) {
    case Activation::relu: return h > T(0) ? one : T(0);
    case Activation::gelu: {
      const T cdf = half * (one + erf(h * T(0.70710678118654752440)));
      const T pdf = exp(-half * h * h) * T(0.39894228040143267794);  // 1 / sqrt(2 pi)
      return cdf + h * pdf;
    }
    case Activation::gelu_tanh: {
      const T c = T(0.79788456080286535588), b = T(0.044715);
      const T t = tanh(c * (h + b * h * h * h));
      return half * (one + t) + half * h * (one - t * t) * c * (one + T(3) * b * h * h);
    }
    case Activation::sigmoid: {
      const T s = one / (one + exp(-h));
      return s * (one - s);
    }
    case Activation::silu: {
      const T s = one / (one + exp(-h));
      return s * (one + h * (one - s));
    }
  }
  return one;
}

}  // namespace mxd
