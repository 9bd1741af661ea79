// SPDX-License-Identifier: MIT
/// @file layer.hpp
/// @brief The MxD layer's forward and analytic backward, written once over backend<Device>.
///
/// For one row x (I = d_in, H = d_hidden, O = d_out, N = n_experts, k = top-k):
///
///     hpre = x E + b_enc                z = act(hpre)        (GLU: z = (x W_glu^T + b_glu) * act(hpre))
///     u    = z D                        s = relu(x G^T + b_gate)
///     a    = top-k(s)                   v = a C = sum_j a_j c_{idx_j}
///     y    = u * v (+ x W_skip^T) + b_out
///
/// Expert n is the full-rank map W_n = D diag(c_n), and y = sum_j a_j (z W_{idx_j}) + ...
/// Only the k selected (index, value) pairs per row are kept, so everything touching the
/// experts costs O(B k) in forward and backward. The gate scores, O(B N) work, are computed
/// and reduced to their top-k one row tile at a time, so no buffer holds [B, N].
///
///     mxd::Params<float> p(cfg);  mxd::Workspace<float> ws;  mxd::Grads<float> g(cfg);
///     mxd::forward(p, x, y, ws);                       // x: [B, I] -> y: [B, O]
///     mxd::backward(p, x, dy, ws, g, dx);              // dy: [B, O] -> g, dx: [B, I]
///     mxd::infer(p, x, y, ws);                         // forward's y, no backward cache
#pragma once

#include <algorithm>
#include <cstdint>

#include "backend.hpp"
#include "params.hpp"
#include "steering.hpp"
#include "tensor.hpp"
#include "workspace.hpp"

namespace mxd {

/// What backward does with gradient buffers that already hold values.
enum class GradMode {
  Overwrite,   // grads = dL/dparams of this batch
  Accumulate,  // grads += dL/dparams of this batch (for gradient accumulation)
};

namespace detail {

// Checks forward's arguments; returns the number of steering edits.
template <class T, class Device>
index_t check_forward_args(const Params<T, Device>& p, InView<T, Device> x, InView<T, Device> y,
                           const Steering* steering) {
  const Config& c = p.config;
  MXD_CHECK(x.rows > 0, "x has ", x.rows, " rows: the batch must not be empty");
  check_shape(x, x.rows, c.d_in, "x");
  check_shape(y, x.rows, c.d_out, "y");
  MXD_CHECK(x.contiguous() && y.contiguous(), "x and y must be contiguous row-major views");
  check_shape<const T>(p.E.view(), c.d_in, c.d_hidden, "E (W_enc)");
  check_shape<const T>(p.C.view(), c.n_experts, c.d_out, "C (W_cond^T)");
  check_shape<const T>(p.G.view(), c.n_experts, c.d_in, "G (gate)");
  check_shape<const T>(p.D.view(), c.d_hidden, c.d_out, "D (W_dec)");
  if (!steering) return 0;
  steering->validate(c.n_experts);
  return static_cast<index_t>(steering->edits.size());
}


/// The dense path for rows x: hpre = x E + b_enc; z = act(hpre) (* (x W_glu^T + b_glu));
/// u = z D. x: [R, I]; hpre, g (GLU only, else empty), z: [R, H]; u: [R, O].
template <class T, class Device>
void dense_forward(Context<Device>& ctx, const Params<T, Device>& p, InView<T, Device> x,
                   View<T, Device> hpre, View<T, Device> g, View<T, Device> z,
                   View<T, Device> u) {
  using be = backend<Device>;
  be::gemm(ctx, false, false, T(1), x, p.E.view(), T(0), hpre);
  if (p.config.glu) be::gemm(ctx, false, true, T(1), x, p.W_glu.view(), T(0), g);
  be::bias_activation(ctx, p.config.activation, hpre, p.b_enc.view(), g, p.b_glu.view(), z);
  be::gemm(ctx, false, false, T(1), ConstView<T, Device>(z), p.D.view(), T(0), u);
}

/// Backward of dense_forward given du in ws (decoder and encoder gradients, written as
/// beta grads + this batch's), and dx = dhpre E^T (+ dg W_glu) when dx is not empty.
/// x: [B, I], dx: [B, I] or empty; ws holds the forward's hpre, g, z and backward's du.
template <class T, class Device>
void dense_backward(Context<Device>& ctx, const Params<T, Device>& p, InView<T, Device> x,
                    Workspace<T, Device>& ws, Grads<T, Device>& grads, T beta,
                    View<T, Device> dx) {
  using be = backend<Device>;
  using CV = ConstView<T, Device>;
  const Config& c = p.config;
  // Decoder: dD = z^T du; dz = du D^T.
  be::gemm(ctx, true, false, T(1), CV(ws.z.view()), CV(ws.du.view()), beta, grads.D.view());
  be::gemm(ctx, false, true, T(1), CV(ws.du.view()), p.D.view(), T(0), ws.dz.view());

  // Encoder: dhpre = dz * act'(hpre) (* g); GLU: dg = dz * act(hpre).
  be::activation_backward(ctx, c.activation, CV(ws.hpre.view()), CV(ws.g.view()),
                          CV(ws.dz.view()), ws.dhpre.view(), ws.dg.view());
  be::gemm(ctx, true, false, T(1), x, CV(ws.dhpre.view()), beta, grads.E.view());  // x^T dhpre
  be::col_sum(ctx, CV(ws.dhpre.view()), beta, grads.b_enc.view());
  if (c.glu) {
    be::gemm(ctx, true, false, T(1), CV(ws.dg.view()), x, beta, grads.W_glu.view());  // dg^T x
    be::col_sum(ctx, CV(ws.dg.view()), beta, grads.b_glu.view());
  }
  if (dx.empty()) return;
  be::gemm(ctx, false, true, T(1), CV(ws.dhpre.view()), p.E.view(), T(0), dx);
  if (c.glu) be::gemm(ctx, false, false, T(1), CV(ws.dg.view()), p.W_glu.view(), T(1), dx);
}


/// Gate scores s = relu(x G^T + b_gate) of one row tile and their top-k, into the first k
/// columns of idx and val. row0 is x's first row in the batch (for error messages).
/// x: [R, I], scores: [R, N] (scratch), idx, val: [R, >= k].
template <class T, class Device>
void select_experts(Context<Device>& ctx, const Params<T, Device>& p, InView<T, Device> x,
                    View<T, Device> scores, View<std::int32_t, Device> idx, View<T, Device> val,
                    index_t row0) {
  using be = backend<Device>;
  const index_t k = p.config.k;
  be::gemm(ctx, false, true, T(1), x, p.G.view(), T(0), scores);
  be::gate_topk(ctx, scores, p.b_gate.view(), k,
                View<std::int32_t, Device>(idx.data, idx.rows, k, idx.ld),
                View<T, Device>(val.data, val.rows, k, val.ld), row0);
}

/// Steering's edits (if any) on the selection, then y = u * (sum_j a_j c_{idx_j})
/// (+ x W_skip^T) + b_out. x: [R, I], idx, val: [R, k + edits] (top-k in the first k columns),
/// coef: [R, k + edits] with steering, else empty; u, v, y: [R, O].
template <class T, class Device>
void output(Context<Device>& ctx, const Params<T, Device>& p, InView<T, Device> x,
            const Steering* steering, View<std::int32_t, Device> idx, View<T, Device> val,
            View<T, Device> coef, View<T, Device> u, View<T, Device> v, View<T, Device> y) {
  using be = backend<Device>;
  const Config& c = p.config;
  const bool steered = steering && !steering->edits.empty();
  if (steered) steer_selection(ctx, *steering, c.k, idx, val, coef);
  if (c.skip) be::gemm(ctx, false, true, T(1), x, p.W_skip.view(), T(0), y);  // [R, O]
  be::gather_rows(ctx, ConstView<std::int32_t, Device>(idx),
                  ConstView<T, Device>(steered ? coef : val), p.C.view(), v, false);
  be::modulate(ctx, ConstView<T, Device>(u), ConstView<T, Device>(v), p.b_out.view(), y, c.skip);
}

}  // namespace detail

/// y = MxD(x). Fills the workspace's cache for backward. With `steering`, its edits are
/// applied to the coefficients after top-k (see steering.hpp).
/// x: [B, I], y: [B, O] (overwritten).
template <class T, class Device>
void forward(const Params<T, Device>& p, InView<T, Device> x, View<T, Device> y,
             Workspace<T, Device>& ws, const Steering* steering = nullptr) {
  const Config& c = p.config;
  const index_t edits = detail::check_forward_args<T, Device>(p, x, y, steering);
  const index_t tile = ws.prepare_forward(c, x.rows, edits);
  auto& ctx = ws.ctx;
  detail::dense_forward(ctx, p, x, ws.hpre.view(), ws.g.view(), ws.z.view(), ws.u.view());
  for (index_t r0 = 0; r0 < x.rows; r0 += tile) {
    const index_t rows = std::min(tile, x.rows - r0);
    detail::select_experts(ctx, p, x.block_rows(r0, rows), ws.scores.view().block_rows(0, rows),
                           ws.topk_idx.view().block_rows(r0, rows),
                           ws.topk_val.view().block_rows(r0, rows), r0);
  }
  detail::output(ctx, p, x, steering, ws.topk_idx.view(), ws.topk_val.view(), ws.coef.view(),
                 ws.u.view(), ws.v.view(), y);
}

/// y = MxD(x) as forward() computes it, bit for bit, but tile by tile with no backward cache:
/// the workspace holds one row tile of everything (eval, inspection, serving). Afterwards
/// backward() refuses the workspace until the next forward().
/// x: [B, I], y: [B, O] (overwritten).
template <class T, class Device>
void infer(const Params<T, Device>& p, InView<T, Device> x, View<T, Device> y,
           Workspace<T, Device>& ws, const Steering* steering = nullptr) {
  const Config& c = p.config;
  const index_t edits = detail::check_forward_args<T, Device>(p, x, y, steering);
  const index_t tile = ws.prepare_infer(c, x.rows, edits);
  auto& ctx = ws.ctx;
  for (index_t r0 = 0; r0 < x.rows; r0 += tile) {
    const index_t rows = std::min(tile, x.rows - r0);
    auto xr = x.block_rows(r0, rows);
    auto u = ws.u.view().block_rows(0, rows);
    auto idx = ws.topk_idx.view().block_rows(0, rows);
    auto val = ws.topk_val.view().block_rows(0, rows);
    detail::dense_forward(ctx, p, xr, ws.hpre.view().block_rows(0, rows),
                          ws.g.view().block_rows(0, ws.g.rows() ? rows : 0),
                          ws.z.view().block_rows(0, rows), u);
    detail::select_experts(ctx, p, xr, ws.scores.view().block_rows(0, rows), idx, val, r0);
    detail::output(ctx, p, xr, steering, idx, val, ws.coef.view().block_rows(0, edits ? rows : 0),
                   u, ws.v.view().block_rows(0, rows), y.block_rows(r0, rows));
  }
}

/// Analytic backward of forward() for the batch cached in `ws`.
/// x: [B, I] (the forward's input), dy: [B, O], grads: the parameters' shapes (written per
/// `mode`), dx: [B, I] is overwritten with dL/dx; pass an empty view to skip it.
template <class T, class Device>
void backward(const Params<T, Device>& p, InView<T, Device> x, InView<T, Device> dy,
              Workspace<T, Device>& ws, Grads<T, Device>& grads, View<T, Device> dx = {},
              GradMode mode = GradMode::Overwrite) {
  using be = backend<Device>;
  const Config& c = p.config;
  MXD_CHECK(ws.batch == x.rows && ws.batch > 0, "backward: workspace holds a forward of ",
            ws.batch, " rows but x has ", x.rows, " (call forward on this batch first)");
  check_shape(x, ws.batch, c.d_in, "x");
  check_shape(dy, ws.batch, c.d_out, "dy");
  MXD_CHECK(x.contiguous() && dy.contiguous(), "x and dy must be contiguous row-major views");
  if (!dx.empty()) check_shape(dx, ws.batch, c.d_in, "dx");
  {
    const Config& gc = grads.config;
    MXD_CHECK(gc.d_in == c.d_in && gc.d_hidden == c.d_hidden && gc.d_out == c.d_out &&
                  gc.n_experts == c.n_experts && gc.glu == c.glu && gc.skip == c.skip &&
                  grads.E.rows() == c.d_in && grads.C.rows() == c.n_experts,
              "backward: gradient buffers were made for another config (construct them as "
              "Grads(params.config))");
  }
  ws.prepare_backward(c);
  auto& ctx = ws.ctx;
  const bool acc = mode == GradMode::Accumulate;
  const T beta = acc ? T(1) : T(0);
  ConstView<T, Device> xv = x;
  using CV = ConstView<T, Device>;

  // Output: y = u * v (+ x W_skip^T) + b_out.
  be::col_sum(ctx, dy, beta, grads.b_out.view());                      // db_out = sum_rows dy
  if (c.skip) be::gemm(ctx, true, false, T(1), dy, xv, beta, grads.W_skip.view());  // dy^T x
  be::output_backward(ctx, dy, ws.u.view(), ws.v.view(), ws.du.view(), ws.dv.view());
  // du = dy * v, dv = dy * u

  // Experts, over the k selected pairs only (a = the mixed coefficients, which steering may
  // have edited; the gate values' sign is relu'(s)):
  //   ds[b,j] = relu'(s) * dv[b] . c_{idx[b,j]}
  //   dC[n] += a[b,j] dv[b];  dG[n] += ds[b,j] x[b];  db_gate[n] += ds[b,j]   (idx[b,j] = n)
  be::expert_coefficient_grad(ctx, ws.topk_idx.view(), ws.topk_val.view(), p.C.view(),
                              CV(ws.dv.view()), ws.ds.view());
  be::group_by_expert(ctx, ws.topk_idx.view(), c.n_experts, ws.order.view(), ws.offsets.view());
  be::expert_weight_grads(ctx, ws.topk_idx.view(), ws.coefficients(), CV(ws.ds.view()),
                          ws.order.view(), ws.offsets.view(), CV(ws.dv.view()), xv,
                          grads.C.view(), grads.G.view(), grads.b_gate.view(), acc);

  detail::dense_backward(ctx, p, xv, ws, grads, beta, dx);

  // Input: dx += (dy W_skip) + sum_j ds[b,j] g_{idx[b,j]}.
  if (dx.empty()) return;
  if (c.skip) be::gemm(ctx, false, false, T(1), dy, p.W_skip.view(), T(1), dx);
  be::gather_rows(ctx, ws.topk_idx.view(), CV(ws.ds.view()), p.G.view(), dx, true);
}

}  // namespace mxd
