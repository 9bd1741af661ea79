// SPDX-License-Identifier: MIT
/// @file interp/special_cases.hpp
/// @brief Dense MLPs and GLUs as MxDs: one expert (N = 1, k = 1) whose vector c is all ones and
/// whose gate always fires with coefficient 1, so y = (z D) * 1 + b equals the dense layer.
///
///     // y = gelu(x W1 + b1) W2 + b2, W1: [I, H], W2: [H, O]
///     mxd::Params<double> p = mxd::interp::mxd_from_mlp(W1, b1, W2, b2, mxd::Activation::gelu);
#pragma once

#include "../params.hpp"

namespace mxd::interp {

namespace detail {

template <class T>
Params<T> one_expert(index_t I, index_t H, index_t O, Activation act, bool glu) {
  Config c;
  c.d_in = I; c.d_hidden = H; c.d_out = O; c.n_experts = 1; c.k = 1;
  c.activation = act;
  c.glu = glu;
  Params<T> p(c);
  for (index_t o = 0; o < O; ++o) p.C(0, o) = T(1);
  p.b_gate[0] = T(1);  // G = 0: s = relu(0 + 1) = 1 for every input
  return p;
}

template <class T>
void copy(Tensor<T>& dst, const Tensor<T>& src, const char* what) {
  check_shape<const T>(src.view(), dst.rows(), dst.cols(), what);
  memory<cpu>::copy(dst.data(), src.data(), src.bytes());
}

}  // namespace detail

/// The MxD equal to y = act(x W1 + b1) W2 + b2. W1: [I, H], b1: [1, H], W2: [H, O], b2: [1, O].
template <class T>
Params<T> mxd_from_mlp(const Tensor<T>& W1, const Tensor<T>& b1, const Tensor<T>& W2,
                       const Tensor<T>& b2, Activation act) {
  Params<T> p = detail::one_expert<T>(W1.rows(), W1.cols(), W2.cols(), act, false);
  detail::copy(p.E, W1, "W1");
  detail::copy(p.b_enc, b1, "b1");
  detail::copy(p.D, W2, "W2");
  detail::copy(p.b_out, b2, "b2");
  return p;
}

/// The MxD equal to the GLU y = (act(x W1 + b1) * (x Wg^T + bg)) W2 + b2.
/// W1: [I, H], b1: [1, H], Wg: [H, I], bg: [1, H], W2: [H, O], b2: [1, O].
template <class T>
Params<T> mxd_from_glu(const Tensor<T>& W1, const Tensor<T>& b1, const Tensor<T>& Wg,
                       const Tensor<T>& bg, const Tensor<T>& W2, const Tensor<T>& b2, Activation act) {
  Params<T> p = detail::one_expert<T>(W1.rows(), W1.cols(), W2.cols(), act, true);
  detail::copy(p.E, W1, "W1");
  detail::copy(p.b_enc, b1, "b1");
  detail::copy(p.W_glu, Wg, "Wg");
  detail::copy(p.b_glu, bg, "bg");
  detail::copy(p.D, W2, "W2");
  detail::copy(p.b_out, b2, "b2");
  return p;
}

}  // namespace mxd::interp
