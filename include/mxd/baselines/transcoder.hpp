// SPDX-License-Identifier: MIT
/// @file baselines/transcoder.hpp
/// @brief The TopK transcoder (and, with `skip`, the skip transcoder) that MxD is compared with,
/// with an analytic backward, over the same backend primitives as the MxD layer.
///
/// For one row x (I = d_in, M = n_latents, O = d_out):
///
///     a = top-k(relu(x W_enc + b_enc))        k (index, value) pairs
///     y = sum_j a_j W_dec[idx_j] (+ x W_skip^T) + b_out
///
/// With `rank_by_decoder_norm` the k latents are those with the largest relu(pre_m) |W_dec[m]|
/// (the size of what each would add to y) and a keeps relu(pre_m): SAELens's
/// rescale_acts_by_decoder_norm, which trains free decoder rows as if they had unit norm. Only
/// the selection changes, so the backward is the same given it.
///
/// This is exactly MxD's gating branch with u = 1, so gate_topk, gather_rows, modulate (with no
/// u) and the sparse expert backward serve it unchanged. Each latent contributes a rank-1 map
/// W_enc[:, m] W_dec[m].
///
///     mxd::TranscoderParams<float> tc(mxd::TranscoderConfig{768, 768, 24576, 32});
///     mxd::transcoder_forward(tc, x, y, ws);  mxd::transcoder_backward(tc, x, dy, ws, g, dx);
#pragma once

#include <cmath>
#include <cstdint>
#include <random>

#include "../init.hpp"
#include "../layer.hpp"

namespace mxd {

struct TranscoderConfig {
  index_t d_in = 0;       // I
  index_t d_out = 0;      // O
  index_t n_latents = 0;  // M
  index_t k = 0;          // latents kept per row
  bool skip = false;      // y += x W_skip^T (needs I == O)
  bool rank_by_decoder_norm = false;  // select by relu(pre_m) |W_dec[m]| (SAELens's default)

  void validate() const {
    MXD_CHECK(d_in > 0, "TranscoderConfig.d_in = ", d_in, " must be positive");
    MXD_CHECK(d_out > 0, "TranscoderConfig.d_out = ", d_out, " must be positive");
    MXD_CHECK(n_latents > 0, "TranscoderConfig.n_latents = ", n_latents, " must be positive");
    MXD_CHECK(k > 0, "TranscoderConfig.k = ", k, " must be positive");
    MXD_CHECK(k <= n_latents, "TranscoderConfig.k = ", k, " exceeds n_latents = ", n_latents);
    MXD_CHECK(n_latents <= INT32_MAX, "TranscoderConfig.n_latents = ", n_latents, " is too large");
    MXD_CHECK(!skip || d_in == d_out, "TranscoderConfig.skip needs d_in == d_out, got ", d_in,
              " and ", d_out);
  }
  index_t n_params() const {
    return d_in * n_latents + n_latents + n_latents * d_out + d_out + (skip ? d_out * d_in : 0);
  }
};

/// Transcoder weights. W_enc is kept latent-major [M, I] (a latent's encoder is a row); files
/// use the authors' [I, M] layout. for_each, for_each_param, borrow, ...: ParamSet (params.hpp).
template <class T, class Device = cpu>
struct TranscoderParams : ParamSet<TranscoderParams<T, Device>, TranscoderConfig> {
  using Scalar = T;
  using device = Device;
  TranscoderConfig config;
  Tensor<T, Device> W_enc;   // [M, I]
  Tensor<T, Device> b_enc;   // [1, M]
  Tensor<T, Device> W_dec;   // [M, O]
  Tensor<T, Device> b_out;   // [1, O]   (b_dec_out)
  Tensor<T, Device> W_skip;  // [O, I]   skip only

  TranscoderParams() = default;
  explicit TranscoderParams(const TranscoderConfig& c) : config(c) { this->allocate(); }

  /// The parameters of config c, in for_each order, with their members: the one list.
  /// "W_enc" is held [M, I] here and [I, M] in files.
  template <class F>
  static void layout(const TranscoderConfig& c, F&& f) {
    using P = ParamDesc;
    const index_t I = c.d_in, M = c.n_latents, O = c.d_out;
    f(P("W_enc", M, I, P::units | P::file_transposed), &TranscoderParams::W_enc);
    f(P("b_enc", 1, M, P::units | P::vector), &TranscoderParams::b_enc);
    f(P("W_dec", M, O, P::units), &TranscoderParams::W_dec);
    f(P("b_dec_out", 1, O, P::vector), &TranscoderParams::b_out);
    if (c.skip) f(P("W_skip.weight", O, I), &TranscoderParams::W_skip);
  }
  /// A config with every optional parameter (skip).
  static TranscoderConfig every_param() {
    TranscoderConfig c;
    c.skip = true;
    return c;
  }
};

/// Forward cache and backward scratch of a transcoder.
template <class T, class Device = cpu>
struct TranscoderWorkspace {
  Context<Device> ctx;
  index_t batch = 0;
  Tensor<T, Device> scores;                // [B, M] relu(x W_enc + b_enc)
  Tensor<std::int32_t, Device> topk_idx;   // [B, k]
  Tensor<T, Device> topk_val;              // [B, k]
  Tensor<T, Device> v;                     // [B, O] sum_j a_j W_dec[idx_j]
  Tensor<T, Device> ds;                    // [B, k]
  Tensor<std::int32_t, Device> order;      // [1, B k]
  Tensor<std::int32_t, Device> offsets;    // [1, M + 1]
  Tensor<T, Device> dec_norm;              // [M, 1] |W_dec[m]|   (rank_by_decoder_norm)
  Tensor<T, Device> enc_scaled;            // [M, I] W_enc[m] |W_dec[m]|
  Tensor<T, Device> bias_scaled;           // [M, 1] b_enc[m] |W_dec[m]|
};

/// Initialises like the authors' transcoder: W_enc uniform(+-1/sqrt(I)); W_dec rows uniform
/// then unit norm (norm_dec), or zero with skip as in skip transcoders; biases and W_skip zero.
template <class T>
void init_transcoder(TranscoderParams<T>& p, std::uint64_t seed) {
  const TranscoderConfig& c = p.config;
  std::mt19937_64 rng(seed);
  for (auto* t : {&p.W_enc, &p.b_enc, &p.W_dec, &p.b_out}) t->set_zero();
  if (c.skip) p.W_skip.set_zero();
  detail::fill_uniform(p.W_enc, rng, 1.0 / std::sqrt(static_cast<double>(c.d_in)));
  if (c.skip) return;
  detail::fill_uniform(p.W_dec, rng, 1.0 / std::sqrt(static_cast<double>(c.n_latents)));
  for (index_t m = 0; m < c.n_latents; ++m) {
    double sq = 0;
    for (index_t o = 0; o < c.d_out; ++o) sq += double(p.W_dec(m, o)) * double(p.W_dec(m, o));
    const double inv = 1.0 / std::sqrt(sq);
    for (index_t o = 0; o < c.d_out; ++o) p.W_dec(m, o) = static_cast<T>(double(p.W_dec(m, o)) * inv);
  }
}

/// Folds the decoder rows' norms into the encoder (W_enc[m], b_enc[m] times |W_dec[m]|,
/// W_dec[m] over it) and turns rank_by_decoder_norm off: the same selection and output, up to
/// rounding, from a plain TopK transcoder with unit decoder rows (SAELens's fold_W_dec_norm).
/// A latent with a zero decoder row is left as it is (it adds nothing either way).
template <class T>
void fold_decoder_norm(TranscoderParams<T>& p) {
  const TranscoderConfig& c = p.config;
  for (index_t m = 0; m < c.n_latents; ++m) {
    double sq = 0;
    for (index_t o = 0; o < c.d_out; ++o) sq += double(p.W_dec(m, o)) * double(p.W_dec(m, o));
    const double n = std::sqrt(sq);
    if (n == 0) continue;
    for (index_t i = 0; i < c.d_in; ++i) p.W_enc(m, i) = static_cast<T>(double(p.W_enc(m, i)) * n);
    p.b_enc[m] = static_cast<T>(double(p.b_enc[m]) * n);
    for (index_t o = 0; o < c.d_out; ++o) p.W_dec(m, o) = static_cast<T>(double(p.W_dec(m, o)) / n);
  }
  p.config.rank_by_decoder_norm = false;
}

/// y = transcoder(x). x: [B, I], y: [B, O] (overwritten).
template <class T, class Device>
void transcoder_forward(const TranscoderParams<T, Device>& p, InView<T, Device> x,
                        View<T, Device> y, TranscoderWorkspace<T, Device>& ws) {
  using be = backend<Device>;
  const TranscoderConfig& c = p.config;
  MXD_CHECK(x.rows > 0, "x has ", x.rows, " rows: the batch must not be empty");
  check_shape(x, x.rows, c.d_in, "x");
  check_shape(y, x.rows, c.d_out, "y");
  const index_t B = x.rows;
  ws.batch = B;
  ws.scores.resize(B, c.n_latents, false);
  ws.topk_idx.resize(B, c.k, false);
  ws.topk_val.resize(B, c.k, false);
  ws.v.resize(B, c.d_out, false);
  auto& ctx = ws.ctx;
  if (c.rank_by_decoder_norm) {
    // Scores relu(pre_m) |W_dec[m]| from encoder rows and biases scaled by the norms; the
    // selected values are then divided by them again: a = relu(pre_m).
    const index_t M = c.n_latents;
    ws.dec_norm.resize(M, 1, false);
    ws.enc_scaled.resize(M, c.d_in, false);
    ws.bias_scaled.resize(M, 1, false);
    be::row_norms(ctx, p.W_dec.view(), ws.dec_norm.view());
    be::scale_rows(ctx, ws.dec_norm.view(), p.W_enc.view(), ws.enc_scaled.view());
    be::scale_rows(ctx, ws.dec_norm.view(), InView<T, Device>(p.b_enc.data(), M, 1),
                   ws.bias_scaled.view());
    be::gemm(ctx, false, true, T(1), x, ws.enc_scaled.view(), T(0), ws.scores.view());  // [B, M]
    be::gate_topk(ctx, ws.scores.view(), InView<T, Device>(ws.bias_scaled.data(), 1, M), c.k,
                  ws.topk_idx.view(), ws.topk_val.view());
    be::divide_selected(ctx, ws.topk_idx.view(), ws.dec_norm.view(), ws.topk_val.view());
  } else {
    be::gemm(ctx, false, true, T(1), x, p.W_enc.view(), T(0), ws.scores.view());   // [B, M]
    be::gate_topk(ctx, ws.scores.view(), p.b_enc.view(), c.k, ws.topk_idx.view(), ws.topk_val.view());
  }
  if (c.skip) be::gemm(ctx, false, true, T(1), x, p.W_skip.view(), T(0), y);
  be::gather_rows(ctx, ws.topk_idx.view(), ws.topk_val.view(), p.W_dec.view(), ws.v.view(), false);
  be::modulate(ctx, InView<T, Device>(), ws.v.view(), p.b_out.view(), y, c.skip);  // u = 1
}

/// Analytic backward of transcoder_forward for the batch cached in `ws`. Gradients follow
/// `mode`; dx: [B, I] is overwritten unless empty.
template <class T, class Device>
void transcoder_backward(const TranscoderParams<T, Device>& p, InView<T, Device> x,
                         InView<T, Device> dy, TranscoderWorkspace<T, Device>& ws,
                         TranscoderParams<T, Device>& grads, View<T, Device> dx = {},
                         GradMode mode = GradMode::Overwrite) {
  using be = backend<Device>;
  const TranscoderConfig& c = p.config;
  MXD_CHECK(ws.batch == x.rows && ws.batch > 0, "transcoder_backward: workspace holds a forward of ",
            ws.batch, " rows but x has ", x.rows);
  check_shape(x, ws.batch, c.d_in, "x");
  check_shape(dy, ws.batch, c.d_out, "dy");
  if (!dx.empty()) check_shape(dx, ws.batch, c.d_in, "dx");
  MXD_CHECK(grads.W_enc.rows() == c.n_latents && grads.W_dec.cols() == c.d_out &&
                grads.config.skip == c.skip,
            "transcoder_backward: gradient buffers were made for another config");
  const bool acc = mode == GradMode::Accumulate;
  const T beta = acc ? T(1) : T(0);
  ws.ds.resize(ws.batch, c.k, false);
  ws.order.resize(1, ws.batch * c.k, false);
  ws.offsets.resize(1, c.n_latents + 1, false);
  auto& ctx = ws.ctx;
  // y = v + b_out (+ x W_skip^T): dv = dy.
  be::col_sum(ctx, dy, beta, grads.b_out.view());
  if (c.skip) be::gemm(ctx, true, false, T(1), dy, x, beta, grads.W_skip.view());
  // Latents: ds = relu' * dy . W_dec[idx];  dW_dec[m] += a dy;  dW_enc[m] += ds x;  db_enc[m] += ds.
  be::expert_coefficient_grad(ctx, ws.topk_idx.view(), ws.topk_val.view(), p.W_dec.view(), dy,
                              ws.ds.view());
  be::group_by_expert(ctx, ws.topk_idx.view(), c.n_latents, ws.order.view(), ws.offsets.view());
  be::expert_weight_grads(ctx, ws.topk_idx.view(), ws.topk_val.view(), ws.ds.view(),
                          ws.order.view(), ws.offsets.view(), dy, x, grads.W_dec.view(),
                          grads.W_enc.view(), grads.b_enc.view(), acc);
  if (dx.empty()) return;
  if (c.skip) be::gemm(ctx, false, false, T(1), dy, p.W_skip.view(), T(0), dx);
  be::gather_rows(ctx, ws.topk_idx.view(), ws.ds.view(), p.W_enc.view(), dx, c.skip);
}

/// The model interface that train::step (train/step.hpp) and the adapters use for every
/// model: forward, backward and the decoder norm under the same names as the MxD's.
template <class T, class Device>
void forward(const TranscoderParams<T, Device>& p, InView<T, Device> x, View<T, Device> y,
             TranscoderWorkspace<T, Device>& ws) {
  transcoder_forward(p, x, y, ws);
}
template <class T, class Device>
void backward(const TranscoderParams<T, Device>& p, InView<T, Device> x, InView<T, Device> dy,
              TranscoderWorkspace<T, Device>& ws, TranscoderParams<T, Device>& grads,
              View<T, Device> dx = {}, GradMode mode = GradMode::Overwrite) {
  transcoder_backward(p, x, dy, ws, grads, dx, mode);
}

/// norm_dec, before the step: removes from each dW_dec[m] its component along W_dec[m].
/// Skip transcoders keep free decoder rows (their W_dec starts at zero): nothing to do.
template <class T, class Device>
void project_decoder_grads(const TranscoderParams<T, Device>& p, TranscoderParams<T, Device>& g,
                           Context<Device>& ctx) {
  if (!p.config.skip) backend<Device>::remove_parallel_rows(ctx, p.W_dec.view(), g.W_dec.view());
}
/// norm_dec, after the step: W_dec rows to unit norm (not for skip transcoders).
template <class T, class Device>
void normalize_decoder(TranscoderParams<T, Device>& p, Context<Device>& ctx) {
  if (!p.config.skip) backend<Device>::normalize_rows(ctx, p.W_dec.view());
}

}  // namespace mxd
