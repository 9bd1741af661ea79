// SPDX-License-Identifier: MIT
/// @file train/aux_loss.hpp
/// @brief Dead units and the AuxK auxiliary loss that gives them a gradient (Gao et al. 2024,
/// "Scaling and evaluating sparse autoencoders", sec. A.2; EleutherAI's sparsify), for the
/// MxD layer and the TopK / skip transcoders, written over backend<Device>.
///
/// A unit (an MxD expert, a transcoder latent) is *dead* when no training token selected it
/// (with a positive coefficient) within the last `dead_window` tokens. For each row, the k_aux
/// dead units with the largest gate scores (taken before top-k) model the residual
/// e = target - y of the main forward:
///
///     MxD:          e_hat = u * sum_j a_j c_{n_j}       (u = z D from the main forward)
///     transcoder:   e_hat = sum_j a_j W_dec[n_j]
///
/// in one of two forms (AuxK::form):
///
///  - `normalized` (the default): a_j = s_j = relu(x G^T + b_gate) and
///        L_aux = coef * sum_b |e_b - e_hat_b|^2 / sum_b |e_b - mean_b e|^2,
///    the reference implementation's (openai/sparse_autoencoder's normalized_mse): the
///    fraction of the residual's variance the dead units leave unexplained, so the loss does not
///    fade as the main model improves. With one row, or residuals equal in every row, the
///    denominator is 0: the loss is then 0 and no gradient is added.
///  - `saelens` (SAELens 6.x's TopK trainer): a_j = s_j = x G^T + b_gate without relu, so a
///    dead unit whose scores are all negative still gets a gradient, and
///        L_aux = coef * min(n_dead / k_aux, 1) * mean_b |e_b - e_hat_b|^2
///    (k_aux as configured, before it is capped at n_dead), on the scale of Loss::sse.
///
/// A transcoder that ranks its latents by decoder norm (rank_by_decoder_norm) ranks the dead
/// ones the same way (s_j |W_dec[n_j]|) and takes a_j = s_j, as its forward does.
///
/// e and u are constants (no gradient flows through them). For e this is the paper's rule.
/// For u it keeps the aux loss on the dead experts alone: only their rows of G, b_gate and C
/// receive its gradient. Were u free, the dense path (E, D, ...), which every live expert
/// shares, would be pulled toward fitting the residual through experts the main forward does
/// not mix, competing with the main loss.
///
///     mxd::train::AuxK aux{32};                              // k_aux = 32, coef 1/32
///     mxd::train::DeadUnits dead(cfg.n_experts, aux.dead_window);
///     mxd::train::AuxKWorkspace<float> aws;
///     // per step, after forward(p, x, y, ws), the loss and backward(..., grads):
///     double l_aux = mxd::train::auxk_backward(p, x, y, target, ws, dead, aux, aws, grads);
///     dead.record(ws.topk_idx.view(), ws.topk_val.view());   // then the optimizer step
///
/// The dead units' gate scores are computed here, in row tiles of at most `tile_elements`
/// scores, from copies of their gate rows gathered in chunks of at most `tile_elements`
/// values: memory O(tile_elements + N + B (k_aux + O)). The main forward's gate scores are not
/// read (forward keeps only its last row tile of them).
///
/// Measured on `mxd train`'s default job (examples/mxd/README.md, "Dead experts"): it revives the TopK
/// transcoder's dead latents at k = 32 and 64, but MxD's dead experts mostly die for good (the
/// residual is small beside an expert's contribution, so their gate scores are pushed below 0).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "../baselines/transcoder.hpp"
#include "../layer.hpp"
#include "../params.hpp"
#include "../tensor.hpp"
#include "../workspace.hpp"
#include "dead_units.hpp"

namespace mxd::train {

/// How L_aux is formed (see the file's comment).
enum class AuxKForm {
  normalized,  // relu'd scores; the residual's unexplained variance (openai's normalized_mse)
  saelens,     // raw pre-activations; min(n_dead / k_aux, 1) x the rows' mean squared error
};

/// The auxiliary loss's settings. k = 0 turns it off.
struct AuxK {
  index_t k = 0;                     // dead units per row that model the residual (k_aux)
  double coef = 1.0 / 32;            // weight of L_aux (Gao et al.'s alpha)
  index_t dead_window = 8192;        // tokens without a selection after which a unit is dead
  AuxKForm form = AuxKForm::normalized;

  bool enabled() const { return k > 0; }
  /// Throws mxd::Error naming the first invalid field.
  void validate() const {
    MXD_CHECK(k >= 0, "AuxK.k = ", k, " must be >= 0 (0: off)");
    MXD_CHECK(std::isfinite(coef) && coef > 0, "AuxK.coef = ", coef, " must be finite and > 0");
    MXD_CHECK(dead_window > 0, "AuxK.dead_window = ", dead_window, " must be positive");
  }
};


/// Sums n doubles in place over the processes of a distributed run, so that the loss's
/// normalisation is the whole batch's (parallel::DataParallel gives one); empty: one process.
using SumAcross = std::function<void(double* values, index_t n)>;

/// The few element-wise steps of the aux loss that backend<Device> has no primitive for.
/// Specialised below for cpu and in train/aux_loss.cuh for cuda.
template <class Device>
struct auxk_ops;

template <>
struct auxk_ops<cpu> {
  /// idx[b,j] = table[idx[b,j]]: positions among the dead units -> unit numbers.
  /// idx: [B, k], table: [1, n_dead].
  static void take(Context<cpu>&, View<std::int32_t, cpu> idx, ConstView<std::int32_t, cpu> table) {
    for (index_t r = 0; r < idx.rows; ++r)
      for (index_t j = 0; j < idx.cols; ++j) idx(r, j) = table.data[idx(r, j)];
  }

  /// With e = target - pred, L_aux of cfg.form with weight w = cfg.coef * scale, its gradient
  /// written to grad:
  ///   normalized: w |e - e_hat|^2 / |e - mean_rows e|^2, gradient
  ///               w 2 (e_hat - e) / |e - mean e|^2; 0 (grad unwritten) when the denominator is 0;
  ///   saelens:    w |e - e_hat|^2 / B, gradient w 2 (e_hat - e) / B.
  /// Sums in double, in a fixed order; with `sum`, the mean, the sums and B are the whole
  /// batch's over the processes. pred, target, e_hat, grad: [B, O] (this process's rows);
  /// scratch is unused here.
  template <class T>
  static double residual_loss(Context<cpu>&, const AuxK& cfg, double scale,
                              ConstView<T, cpu> pred, ConstView<T, cpu> target,
                              ConstView<T, cpu> e_hat, View<T, cpu> /*scratch*/,
                              View<T, cpu> grad, const SumAcross& sum) {
    const index_t B = pred.rows, O = pred.cols;
    const double coef = cfg.coef * scale;
    auto write_grad = [&](double factor) {
      for (index_t r = 0; r < B; ++r)
        for (index_t o = 0; o < O; ++o)
          grad(r, o) = static_cast<T>(factor * (double(e_hat(r, o)) -
                                                (double(target(r, o)) - double(pred(r, o)))));
    };
    if (cfg.form == AuxKForm::saelens) {
      double err_rows[2] = {0, double(B)};
      for (index_t r = 0; r < B; ++r)
        for (index_t o = 0; o < O; ++o) {
          const double f = double(e_hat(r, o)) - (double(target(r, o)) - double(pred(r, o)));
          err_rows[0] += f * f;
        }
      if (sum) sum(err_rows, 2);
      write_grad(2 * coef / err_rows[1]);
      return coef * err_rows[0] / err_rows[1];
    }
    std::vector<double> mean(static_cast<std::size_t>(O) + 1, 0.0);  // column sums, then rows
    for (index_t r = 0; r < B; ++r)
      for (index_t o = 0; o < O; ++o) mean[o] += double(target(r, o)) - double(pred(r, o));
    mean[O] = double(B);
    if (sum) sum(mean.data(), O + 1);
    for (index_t o = 0; o < O; ++o) mean[o] /= mean[O];
    double var_err[2] = {0, 0};
    double &var = var_err[0], &err = var_err[1];
    for (index_t r = 0; r < B; ++r)
      for (index_t o = 0; o < O; ++o) {
        const double e = double(target(r, o)) - double(pred(r, o)), d = e - mean[o];
        const double f = double(e_hat(r, o)) - e;
        var += d * d;
        err += f * f;
      }
    if (sum) sum(var_err, 2);
    if (!(var > 0)) return 0;
    write_grad(2 * coef / var);
    return coef * err / var;
  }
};

/// Scratch of auxk_backward; reused across steps (buffers only grow).
template <class T, class Device = cpu>
struct AuxKWorkspace {
  /// Most gate scores of dead units held at once (row tiles of tile_elements / n_dead rows),
  /// and most values of their gathered gate rows (chunks of tile_elements / I units).
  index_t tile_elements = index_t(1) << 20;

  std::vector<std::int32_t> host_dead;        // the dead units, ascending
  Tensor<std::int32_t, Device> dead;          // [n_dead, 1] the same on the device
  Tensor<T, Device> ones;                     // [n_dead, 1]
  Tensor<T, Device> active;                   // [B, k'] ones: every aux slot passes (saelens)
  Tensor<T, Device> gate_dead;                // [chunk, I] a chunk of their gate rows
  Tensor<T, Device> bias_dead;                // [1, n_dead] their gate biases
  Tensor<T, Device> scores;                   // [tile, n_dead]
  Tensor<std::int32_t, Device> idx;           // [B, k'] aux selection (unit numbers)
  Tensor<T, Device> val;                      // [B, k'] its coefficients a
  Tensor<T, Device> v, e_hat, grad, du, dv;   // [B, O]
  Tensor<T, Device> scratch;                  // [B, O] (devices that need it for e)
  Tensor<T, Device> ds;                       // [B, k']
  Tensor<std::int32_t, Device> order;         // [1, B k']
  Tensor<std::int32_t, Device> offsets;       // [1, N + 1]

  double loss = 0;      // L_aux of the last call
  index_t n_dead = 0;   // dead units of the last call
};

namespace detail {

// tensor = ones of shape [rows, cols], uploaded only when the shape changes.
template <class T, class Device>
void fill_ones(Tensor<T, Device>& tensor, index_t rows, index_t cols) {
  if (tensor.rows() == rows && tensor.cols() == cols) return;
  Tensor<T> host(rows, cols);
  for (index_t i = 0; i < rows * cols; ++i) host[i] = T(1);
  tensor.resize(rows, cols, false);
  memory<Device>::upload(tensor.data(), host.data(), host.bytes());
}

// The aux loss over one model's units, added to its gradients. gate: [N, I], gate_bias:
// [1, N], dec: [N, O] (c_n or W_dec rows); x: [B, I]; pred, target: [B, O]; u: [B, O], or
// empty for u = 1 (the transcoder); rank_norm: [N, 1], or empty: gate and gate_bias are the
// ranked transcoder's rows scaled by it, and the selected scores are divided by it again;
// d_gate, d_gate_bias, d_dec: the gradients of the unscaled gate, gate_bias, dec (accumulated
// into).
template <class T, class Device>
double auxk_units(Context<Device>& ctx, const AuxK& cfg, const DeadUnits& dead,
                  InView<T, Device> x, InView<T, Device> pred, InView<T, Device> target,
                  InView<T, Device> u, InView<T, Device> gate, InView<T, Device> gate_bias,
                  InView<T, Device> rank_norm,
                  InView<T, Device> dec, View<T, Device> d_gate, View<T, Device> d_gate_bias,
                  View<T, Device> d_dec, AuxKWorkspace<T, Device>& aw, const SumAcross& sum) {
  using be = backend<Device>;
  using ops = auxk_ops<Device>;
  using CV = ConstView<T, Device>;
  using CI = ConstView<std::int32_t, Device>;
  cfg.validate();
  const index_t B = x.rows, I = gate.cols, O = dec.cols, N = gate.rows;
  MXD_CHECK(B > 0, "auxk_backward: x has ", B, " rows: the batch must not be empty");
  check_shape(pred, B, O, "auxk_backward: pred");
  check_shape(target, B, O, "auxk_backward: target");
  if (!u.empty()) check_shape(u, B, O, "auxk_backward: u");
  MXD_CHECK(x.contiguous() && pred.contiguous() && target.contiguous(),
            "auxk_backward: x, pred and target must be contiguous row-major views");
  MXD_CHECK(dead.units() == N, "auxk_backward: the dead-unit tracker has ", dead.units(),
            " units but the model has ", N);
  MXD_CHECK(aw.tile_elements > 0, "AuxKWorkspace.tile_elements = ", aw.tile_elements,
            " must be positive");
  aw.loss = 0;
  dead.list(aw.host_dead);
  const index_t nd = static_cast<index_t>(aw.host_dead.size());
  aw.n_dead = nd;
  if (!cfg.enabled() || nd == 0) return 0;
  const index_t k = std::min(cfg.k, nd);
  const bool saelens = cfg.form == AuxKForm::saelens;

  // The dead units' numbers and gate biases on the device: bias_dead[i] = 1 * b[dead[i]].
  aw.dead.resize(nd, 1, false);
  memory<Device>::upload(aw.dead.data(), aw.host_dead.data(), aw.dead.bytes());
  fill_ones(aw.ones, nd, 1);
  aw.bias_dead.resize(1, nd, false);
  CI dead_col = aw.dead.view();
  be::gather_rows(ctx, dead_col, CV(aw.ones.view()), CV(gate_bias.data, N, 1),
                  View<T, Device>(aw.bias_dead.data(), nd, 1), false);

  // Per row tile: the dead units' scores, then their k best (positions among the dead). Their
  // gate rows are gathered in chunks (gate_dead[i] = 1 * gate[dead[c0 + i]]), once when one
  // chunk holds them all, so neither buffer grows beyond tile_elements.
  const index_t tile = std::clamp<index_t>(aw.tile_elements / nd, 1, B);
  const index_t chunk = std::clamp<index_t>(aw.tile_elements / std::max<index_t>(I, 1), 1, nd);
  aw.scores.resize(tile, nd, false);
  aw.gate_dead.resize(chunk, I, false);
  aw.idx.resize(B, k, false);
  aw.val.resize(B, k, false);
  for (index_t r0 = 0; r0 < B; r0 += tile) {
    const index_t rows = std::min(tile, B - r0);
    View<T, Device> s(aw.scores.data(), rows, nd);
    for (index_t c0 = 0; c0 < nd; c0 += chunk) {
      const index_t len = std::min(chunk, nd - c0);
      View<T, Device> g(aw.gate_dead.data(), len, I);
      if (r0 == 0 || chunk < nd) {
        be::gather_rows(ctx, CI(aw.dead.data() + c0, len, 1), CV(aw.ones.data(), len, 1), gate,
                        g, false);
      }
      be::gemm(ctx, false, true, T(1), x.block_rows(r0, rows), CV(g),
               T(0), View<T, Device>(s.data + c0, rows, len, nd));              // [rows, len]
    }
    be::gate_topk(ctx, s, CV(aw.bias_dead.view()), k, aw.idx.view().block_rows(r0, rows),
                  aw.val.view().block_rows(r0, rows), r0, !saelens);
  }
  ops::take(ctx, aw.idx.view(), dead_col);
  if (!rank_norm.empty()) be::divide_selected(ctx, CI(aw.idx.view()), rank_norm, aw.val.view());

  // e_hat = u * sum_j a_j dec[n_j], its loss against e = target - pred, and dL/de_hat.
  for (auto* t : {&aw.v, &aw.e_hat, &aw.grad, &aw.scratch}) t->resize(B, O, false);
  be::gather_rows(ctx, CI(aw.idx.view()), CV(aw.val.view()), dec, aw.v.view(), false);
  be::modulate(ctx, u, CV(aw.v.view()), CV(), aw.e_hat.view(), false);
  // SAELens weighs the loss down while fewer units are dead than k_aux.
  const double scale = saelens ? std::min(double(nd) / double(cfg.k), 1.0) : 1.0;
  aw.loss = ops::template residual_loss<T>(ctx, cfg, scale, pred, target, CV(aw.e_hat.view()),
                                           aw.scratch.view(), aw.grad.view(), sum);
  if (aw.loss == 0) return 0;  // no variance to explain (or e_hat == e): no gradient

  // The sparse expert backward of layer.hpp over the aux selection, u constant:
  //   dv = grad * u (grad itself for u = 1);  ds = act' dv . dec[n] (act: relu, or the
  //   identity in the saelens form, whose slots all pass the [val > 0] test as ones);
  //   d_dec[n] += a dv;  d_gate[n] += ds x;  d_bias[n] += ds.
  CV dv(aw.grad.view());
  if (!u.empty()) {
    aw.du.resize(B, O, false);
    aw.dv.resize(B, O, false);
    be::output_backward(ctx, CV(aw.grad.view()), u, CV(aw.v.view()), aw.du.view(), aw.dv.view());
    dv = CV(aw.dv.view());
  }
  aw.ds.resize(B, k, false);
  aw.order.resize(1, B * k, false);
  aw.offsets.resize(1, N + 1, false);
  if (saelens) fill_ones(aw.active, B, k);
  be::expert_coefficient_grad(ctx, CI(aw.idx.view()), CV((saelens ? aw.active : aw.val).view()),
                              dec, dv, aw.ds.view());
  be::group_by_expert(ctx, CI(aw.idx.view()), N, aw.order.view(), aw.offsets.view());
  be::expert_weight_grads(ctx, CI(aw.idx.view()), CV(aw.val.view()), CV(aw.ds.view()),
                          CI(aw.order.view()), CI(aw.offsets.view()), dv, x,
                          d_dec, d_gate, d_gate_bias, /*accumulate=*/true);
  return aw.loss;
}

}  // namespace detail

/// The AuxK loss of the MxD forward cached in `ws` (forward(p, x, pred, ws) was the last call
/// on it), with its gradient added to grads.G, grads.b_gate and grads.C of the dead experts
/// (GradMode::Accumulate; no other gradient and no dx). Returns L_aux (coef included); 0,
/// with grads untouched, when cfg is off, no expert is dead or the residual has no variance.
/// x: [B, I], pred (the forward's y), target: [B, O].
template <class T, class Device>
double auxk_backward(const Params<T, Device>& p, InView<T, Device> x, InView<T, Device> pred,
                     InView<T, Device> target, Workspace<T, Device>& ws, const DeadUnits& dead,
                     const AuxK& cfg, AuxKWorkspace<T, Device>& aw, Grads<T, Device>& grads,
                     const SumAcross& sum = {}) {
  const Config& c = p.config;
  MXD_CHECK(ws.batch == x.rows, "auxk_backward: workspace holds a forward of ", ws.batch,
            " rows but x has ", x.rows, " (call forward on this batch first)");
  check_shape(x, x.rows, c.d_in, "auxk_backward: x");
  MXD_CHECK(grads.config.n_experts == c.n_experts && grads.G.rows() == c.n_experts &&
                grads.G.cols() == c.d_in && grads.C.cols() == c.d_out,
            "auxk_backward: gradient buffers were made for another config");
  using CV = ConstView<T, Device>;
  return detail::auxk_units<T, Device>(ws.ctx, cfg, dead, x, pred, target, CV(ws.u.view()),
                                       p.G.view(), p.b_gate.view(), CV(), p.C.view(),
                                       grads.G.view(), grads.b_gate.view(), grads.C.view(), aw,
                                       sum);
}

/// The same for a TopK or skip transcoder (u = 1): the dead latents' rows of W_enc, b_enc and
/// W_dec receive the gradient. ws holds transcoder_forward(p, x, pred, ws): with
/// rank_by_decoder_norm its scaled encoder rows rank the dead latents.
template <class T, class Device>
double auxk_backward(const TranscoderParams<T, Device>& p, InView<T, Device> x,
                     InView<T, Device> pred, InView<T, Device> target,
                     TranscoderWorkspace<T, Device>& ws, const DeadUnits& dead, const AuxK& cfg,
                     AuxKWorkspace<T, Device>& aw, TranscoderParams<T, Device>& grads,
                     const SumAcross& sum = {}) {
  const TranscoderConfig& c = p.config;
  MXD_CHECK(ws.batch == x.rows, "auxk_backward: workspace holds a forward of ", ws.batch,
            " rows but x has ", x.rows, " (call transcoder_forward on this batch first)");
  check_shape(x, x.rows, c.d_in, "auxk_backward: x");
  MXD_CHECK(grads.W_enc.rows() == c.n_latents && grads.W_enc.cols() == c.d_in &&
                grads.W_dec.cols() == c.d_out,
            "auxk_backward: gradient buffers were made for another config");
  using CV = ConstView<T, Device>;
  if (c.rank_by_decoder_norm)  // the forward's scaled encoder rows and biases rank the dead
    return detail::auxk_units<T, Device>(
        ws.ctx, cfg, dead, x, pred, target, CV(), CV(ws.enc_scaled.view()),
        CV(ws.bias_scaled.data(), 1, c.n_latents), CV(ws.dec_norm.view()), p.W_dec.view(),
        grads.W_enc.view(), grads.b_enc.view(), grads.W_dec.view(), aw, sum);
  return detail::auxk_units<T, Device>(ws.ctx, cfg, dead, x, pred, target, CV(),
                                       p.W_enc.view(), p.b_enc.view(), CV(), p.W_dec.view(),
                                       grads.W_enc.view(), grads.b_enc.view(),
                                       grads.W_dec.view(), aw, sum);
}

}  // namespace mxd::train
