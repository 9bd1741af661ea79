// SPDX-License-Identifier: MIT
/// @file elementwise.hpp
/// @brief The per-element bodies of the backends' element-wise primitives, written once as
/// MXD_HOST_DEVICE functions: backend<cpu>'s loops and backend<cuda>'s kernels both call
/// them, so the two devices cannot drift apart. Bodies that serve one header live beside it
/// (the loss gradients in loss.hpp, steering's row edits in steering.hpp).
///
/// Each body keeps the operations, and their order, of the loops it replaced, so results are
/// the same bits as before on either device. A compiler may still fuse a product and a sum
/// of one expression into a fused multiply-add (GCC and nvcc do by default), as it did there.
#pragma once

#include "activation.hpp"
#include "device.hpp"

namespace mxd {

/// The per-step scalars of one AdamW update, as torch computes them (adamw_update's argument).
struct AdamWStep {
  double lr, beta1, beta2, eps, weight_decay;
  double bias_correction1;       // 1 - beta1^t
  double bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

namespace detail {

/// bias_activation's GLU step of one element, after hpre += b_enc gave h: g += b_glu;
/// returns z = g * act(h). (Without GLU, z = activate(act, h).) g and b_glu are the caller's
/// memory, read where the sum reads them; the sum is kept in a local for the product.
template <class T>
MXD_HOST_DEVICE T glu_act(Activation act, T h, T& g, const T& b_glu) {
  const T gb = g + b_glu;
  g = gb;
  return gb * activate(act, h);
}

/// activation_backward of one element without GLU: returns dh = dz * act'(h).
template <class T>
MXD_HOST_DEVICE T act_backward(Activation act, T h, T dz) {
  return dz * activate_grad(act, h);
}

/// activation_backward of one element with GLU (z = g * act(h)): dh = dz * g * act'(h),
/// then dg = dz * act(h).
template <class T>
MXD_HOST_DEVICE void act_backward_glu(Activation act, T h, T g, T dz, T& dh, T& dg) {
  dh = dz * g * activate_grad(act, h);
  dg = dz * activate(act, h);
}

/// One output element: returns (accumulate ? y : 0) + u * v + b, the layer's y = u * v + b_out
/// (u = 1 for the transcoder, b = 0 where there is no bias). y is read only to accumulate.
template <class T>
MXD_HOST_DEVICE T modulate(const T& y, T u, T v, T b, bool accumulate) {
  const T out = u * v;
  return (accumulate ? y + out : out) + b;
}

/// divide_selected's element: v / s, or 0 where s is 0 (a latent with a zero decoder row
/// decodes to nothing, whatever its score).
template <class T>
MXD_HOST_DEVICE T divide_or_zero(T v, T s) {
  return s == T(0) ? T(0) : v / s;
}

/// An AdamWStep's scalars in the parameters' type T, as the update uses them.
template <class T>
struct AdamWScalars {
  T decay, w, b2, one_minus_b2, bc2, eps, step_size;

  static AdamWScalars from(const AdamWStep& s) {
    return {T(1 - s.lr * s.weight_decay), T(1 - s.beta1), T(s.beta2), T(1 - s.beta2),
            T(s.bias_correction2_sqrt), T(s.eps), T(s.lr / s.bias_correction1)};
  }
};

// One torch.optim.AdamW update of one element, in torch's order of operations, in two steps:
//     adamw_moments:  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
//     adamw_param:    p *= 1 - lr wd;  p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)

/// AdamW's moments of an element: m = lerp(m, g, 1 - beta1), v = beta2 v + (1 - beta2) g^2.
template <class T>
MXD_HOST_DEVICE_INLINE void adamw_moments(T g, T& m, T& v, const AdamWScalars<T>& s) {
  if (s.w < T(0.5)) m += s.w * (g - m);  // torch's lerp
  else m = g - (g - m) * (T(1) - s.w);
  v = v * s.b2 + s.one_minus_b2 * g * g;
}

/// AdamW's step of a parameter element given its new moments m and v.
template <class T>
MXD_HOST_DEVICE_INLINE void adamw_param(T& p, T m, T v, const AdamWScalars<T>& s) {
  using std::sqrt;
  p *= s.decay;
  p += -s.step_size * (m / (sqrt(v) / s.bc2 + s.eps));
}

}  // namespace detail
}  // namespace mxd
