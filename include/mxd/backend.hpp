// SPDX-License-Identifier: MIT
/// @file backend.hpp
/// @brief The backend contract: what a device provides so that the layer, the baselines, the
/// AuxK loss and AdamW, written once over backend<Device>, run on it.
///
/// backend<cpu> (backend/cpu.hpp) and backend<cuda> (backend/cuda.cuh) specialise the
/// declaration below with these static members, for T = float and double. Views are
/// View<T, Device> (written) and InView<T, Device> (read); every view is on the device; calls
/// are ordered on ctx (a stream on the GPU) and results are bit-identical for any thread count
/// or launch geometry. Shapes: B rows, N experts (or latents), k selected per row.
///
///     gemm(ctx, trans_a, trans_b, alpha, A, B, beta, C)       C = alpha op(A) op(B) + beta C
///     bias_activation(ctx, act, hpre, b_enc, g, b_glu, z)      hpre += b_enc; z = act(hpre) (GLU: g += b_glu, z *= g)
///     gate_topk(ctx, scores, b_gate, k, idx, val, row0, relu)  top-k per row of relu(scores + b_gate) (or without relu); scores are scratch
///     gather_rows(ctx, idx, w, R, out, accumulate)             out (+)= sum_j w[:, j] R[idx[:, j]]
///     modulate(ctx, u, v, b_out, y, accumulate)                y (+)= u * v + b_out (u, b_out optional)
///     col_sum(ctx, A, beta, out)                               out = beta out + sum of A's rows
///     output_backward(ctx, dy, u, v, du, dv)                   du = dy * v, dv = dy * u
///     expert_coefficient_grad(ctx, idx, val, C, dv, ds)        ds = [val > 0] dv . C[idx]
///     group_by_expert(ctx, idx, N, order, offsets)             stable counting sort by expert
///     expert_weight_grads(ctx, idx, val, ds, order, offsets, dv, x, dC, dG, db_gate, accumulate)
///     activation_backward(ctx, act, hpre, g, dz, dhpre, dg)    through act (and GLU)
///     find_non_finite(ctx, v) -> index_t                       first NaN/Inf position, or -1
///     sum_squares(ctx, v) -> double                            sum of v's squares, in double
///     scale(ctx, v, s)                                         v *= s (in double, rounded once)
///     adamw_update(ctx, p, g, m, v, step)                      one torch.optim.AdamW update
///     remove_parallel_rows(ctx, C, g)                          g[n] -= (g[n].c[n] / |c[n]|^2) c[n]
///     normalize_rows(ctx, C)                                   rows of C to unit norm
///     row_norms(ctx, C, out)                                   out[n] = |C[n]|
///     scale_rows(ctx, s, A, out)                               out[n] = s[n] A[n]
///     divide_selected(ctx, idx, s, val)                        val[b, j] /= s[idx[b, j]] (0 where s is 0)
///
/// The element-wise primitives' per-element bodies are written once, in elementwise.hpp (and
/// beside what they serve: loss.hpp, steering.hpp), and called by both devices' loops.
///
/// backend_contract_holds<Device, T>() checks every signature at compile time; the test suites
/// static_assert it for both devices.
#pragma once

#include <cstdint>
#include <type_traits>

#include "activation.hpp"
#include "elementwise.hpp"
#include "tensor.hpp"

namespace mxd {

/// The primitives a device provides; specialised in backend/cpu.hpp and backend/cuda.cuh.
template <class Device>
struct backend;

namespace detail {
// A value of type X in unevaluated operands (decltype) only; never defined.
template <class X>
X arg();
}  // namespace detail

/// True when backend<Device> has every primitive of the contract above with its signature for
/// element type T; a missing or mistyped one fails to compile, naming it.
template <class Device, class T>
constexpr bool backend_contract_holds() {
  using be = backend<Device>;
  using detail::arg;
  using Ctx = Context<Device>&;
  using W = View<T, Device>;
  using R = InView<T, Device>;
  using Wi = View<std::int32_t, Device>;
  using Ri = InView<std::int32_t, Device>;
  using Step = const AdamWStep&;
  using V = void;
  return std::is_same_v<decltype(be::template gemm<T>(arg<Ctx>(), false, false, T(), arg<R>(), arg<R>(), T(), arg<W>())), V> &&
         std::is_same_v<decltype(be::template bias_activation<T>(arg<Ctx>(), Activation(), arg<W>(), arg<R>(), arg<W>(), arg<R>(), arg<W>())), V> &&
         std::is_same_v<decltype(be::template gate_topk<T>(arg<Ctx>(), arg<W>(), arg<R>(), index_t(), arg<Wi>(), arg<W>(), index_t(), false)), V> &&
         std::is_same_v<decltype(be::template gather_rows<T>(arg<Ctx>(), arg<Ri>(), arg<R>(), arg<R>(), arg<W>(), false)), V> &&
         std::is_same_v<decltype(be::template modulate<T>(arg<Ctx>(), arg<R>(), arg<R>(), arg<R>(), arg<W>(), false)), V> &&
         std::is_same_v<decltype(be::template col_sum<T>(arg<Ctx>(), arg<R>(), T(), arg<W>())), V> &&
         std::is_same_v<decltype(be::template output_backward<T>(arg<Ctx>(), arg<R>(), arg<R>(), arg<R>(), arg<W>(), arg<W>())), V> &&
         std::is_same_v<decltype(be::template expert_coefficient_grad<T>(arg<Ctx>(), arg<Ri>(), arg<R>(), arg<R>(), arg<R>(), arg<W>())), V> &&
         std::is_same_v<decltype(be::group_by_expert(arg<Ctx>(), arg<Ri>(), index_t(), arg<Wi>(), arg<Wi>())), V> &&
         std::is_same_v<decltype(be::template expert_weight_grads<T>(arg<Ctx>(), arg<Ri>(), arg<R>(), arg<R>(), arg<Ri>(), arg<Ri>(), arg<R>(), arg<R>(), arg<W>(), arg<W>(), arg<W>(), false)), V> &&
         std::is_same_v<decltype(be::template activation_backward<T>(arg<Ctx>(), Activation(), arg<R>(), arg<R>(), arg<R>(), arg<W>(), arg<W>())), V> &&
         std::is_same_v<decltype(be::template find_non_finite<T>(arg<Ctx>(), arg<R>())), index_t> &&
         std::is_same_v<decltype(be::template sum_squares<T>(arg<Ctx>(), arg<R>())), double> &&
         std::is_same_v<decltype(be::template scale<T>(arg<Ctx>(), arg<W>(), double())), V> &&
         std::is_same_v<decltype(be::template adamw_update<T>(arg<Ctx>(), arg<W>(), arg<R>(), arg<W>(), arg<W>(), arg<Step>())), V> &&
         std::is_same_v<decltype(be::template remove_parallel_rows<T>(arg<Ctx>(), arg<R>(), arg<W>())), V> &&
         std::is_same_v<decltype(be::template normalize_rows<T>(arg<Ctx>(), arg<W>())), V> &&
         std::is_same_v<decltype(be::template row_norms<T>(arg<Ctx>(), arg<R>(), arg<W>())), V> &&
         std::is_same_v<decltype(be::template scale_rows<T>(arg<Ctx>(), arg<R>(), arg<R>(), arg<W>())), V> &&
         std::is_same_v<decltype(be::template divide_selected<T>(arg<Ctx>(), arg<Ri>(), arg<R>(), arg<W>())), V>;
}

}  // namespace mxd
