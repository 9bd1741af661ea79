// SPDX-License-Identifier: MIT
/// @file train/baseline.hpp
/// @brief What `mxd train` needs to train its transcoder baselines the way the sparse-
/// autoencoder community does, beside the MxD authors' recipe: the exact parameter match by
/// latent count, SAELens's tied initialisation, and the recipe's knobs in one struct.
///
///     // An MxD with as many parameters as a transcoder of 2048 latents (1792 experts for
///     // 64 -> 256 -> 64); with skip, MxD+skip against the skip transcoder (1760 for 2016):
///     index_t n = mxd::train::experts_for_latents(64, 256, 64, 2048);
///     mxd::TranscoderParams<float> tp(tcc);
///     mxd::train::init_transcoder_tied(tp, /*seed=*/1, /*dec_norm=*/0.1);
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>

#include "../baselines/transcoder.hpp"
#include "../config.hpp"
#include "../init.hpp"
#include "../loss.hpp"
#include "aux_loss.hpp"

namespace mxd::train {

/// The number of experts N whose MxD (I -> H -> O, with GLU / skip as given) has the parameter
/// count nearest that of a transcoder of M latents; the transcoder has a skip path exactly when
/// the MxD has one, so each pair is like for like (MxD vs TopK, MxD+skip vs skip transcoder).
/// Ties go to the smaller N. Without GLU the two counts are equal when M - N = H, always.
inline index_t experts_for_latents(index_t I, index_t H, index_t O, index_t M, bool glu = false,
                                   bool skip = false) {
  MXD_CHECK(I > 0 && H > 0 && O > 0 && M > 0, "experts_for_latents: sizes must be positive (I = ",
            I, ", H = ", H, ", O = ", O, ", M = ", M, ")");
  TranscoderConfig t{I, O, M, 1, skip};
  Config c;
  c.d_in = I;
  c.d_hidden = H;
  c.d_out = O;
  c.glu = glu;
  c.skip = skip;
  c.n_experts = 0;
  const index_t p_tc = t.n_params(), p_base = c.n_params(), per = I + O + 1;
  MXD_CHECK(p_tc >= p_base + per, "experts_for_latents: a transcoder of ", M, " latents has ", p_tc,
            " parameters, too few for an MxD with one expert (its dense part alone has ", p_base,
            ")");
  const index_t lo = (p_tc - p_base) / per;  // floor; lo + 1 may be nearer
  return (p_tc - p_base) - lo * per > (lo + 1) * per - (p_tc - p_base) ? lo + 1 : lo;
}

/// SAELens's initialisation (TrainingSAE.initialize_weights, 6.x): the decoder like
/// nn.init.kaiming_uniform_ on [M, O], each row rescaled to norm `dec_norm` (0.1, Anthropic's
/// April 2024 heuristic), the encoder its transpose (W_enc [M, I] latent-major = W_dec),
/// biases 0; a skip path starts at 0. Needs d_in == d_out (W_enc = W_dec^T).
template <class T>
void init_transcoder_tied(TranscoderParams<T>& p, std::uint64_t seed, double dec_norm = 0.1) {
  const TranscoderConfig& c = p.config;
  MXD_CHECK(c.d_in == c.d_out, "tied initialisation needs d_in == d_out (W_enc = W_dec^T), got d_in = ",
            c.d_in, " and d_out = ", c.d_out);
  MXD_CHECK(std::isfinite(dec_norm) && dec_norm > 0, "tied initialisation: decoder norm ", dec_norm,
            " must be finite and > 0");
  std::mt19937_64 rng(seed);
  for (auto* t : {&p.W_enc, &p.b_enc, &p.W_dec, &p.b_out}) t->set_zero();
  if (c.skip) p.W_skip.set_zero();
  // kaiming_uniform_ (a = 0): bound sqrt(6 / fan_in), fan_in = O for a [M, O] tensor. The rows
  // are then rescaled, so only the direction of each row matters.
  mxd::detail::fill_uniform(p.W_dec, rng, std::sqrt(6.0 / static_cast<double>(c.d_out)));
  for (index_t m = 0; m < c.n_latents; ++m) {
    double sq = 0;
    for (index_t o = 0; o < c.d_out; ++o) sq += double(p.W_dec(m, o)) * double(p.W_dec(m, o));
    const double s = sq > 0 ? dec_norm / std::sqrt(sq) : 0.0;
    for (index_t o = 0; o < c.d_out; ++o) {
      p.W_dec(m, o) = static_cast<T>(double(p.W_dec(m, o)) * s);
      p.W_enc(m, o) = p.W_dec(m, o);
    }
  }
}

/// How `mxd train` trains its transcoder baseline. A default-constructed one is the MxD
/// authors' recipe (what the MxD itself uses); `saelens()` is SAELens 6.x's TopK recipe as far
/// as mxd can follow it, and `mxd train`'s default (examples/lm/README.md, "The baseline's
/// recipe").
struct BaselineRecipe {
  Loss loss = Loss::nmse_ref;  // --tc-loss: nmse_ref (authors), sse (SAELens's), mse
  bool tied_init = false;      // --tc-init tied: SAELens's init_transcoder_tied
  double init_norm = 0.1;      // its decoder row norm
  double clip_grad = 0;        // --tc-clip-grad: global-norm clipping (0: off; SAELens: 1)
  long long warmup = -1;       // --tc-warmup: -1 = the MxD's --warmup (SAELens: 0)
  index_t aux_k = -1;          // --tc-aux-k: -1 = the MxD's --aux-k (SAELens: d_in / 2)
  AuxKForm aux_form = AuxKForm::normalized;  // --tc-aux-form
  double aux_coef = -1;         // AuxK's weight: -1 = the MxD's --aux-coef (SAELens: 1)
  index_t aux_dead_batches = -1;  // its dead window in batches: -1 = --dead-window (SAELens: 1001)
  int norm_dec = -1;           // --tc-norm-dec: -1 = as the MxD (--no-norm-dec), 0 off, 1 on
  bool rank_by_decoder_norm = false;  // --tc-rank-by-dec-norm (TranscoderConfig's)

  /// SAELens 6.x's TopK SAE trainer, for a transcoder of input width d_in: its MSE (summed
  /// over features, so clipping at 1 bites as it does there), clipping at 1, tied init at norm
  /// 0.1, no warm-up, AuxK in its form with k_aux = d_in / 2, free decoder rows ranked by
  /// their norms.
  static BaselineRecipe saelens(index_t d_in) {
    BaselineRecipe r;
    r.loss = Loss::sse;
    r.rank_by_decoder_norm = true;
    r.tied_init = true;
    r.clip_grad = 1;
    r.warmup = 0;
    r.aux_k = d_in / 2 > 0 ? d_in / 2 : 1;
    r.use_saelens_auxk();
    r.norm_dec = 0;
    return r;
  }

  /// SAELens's AuxK form with its weight (aux_loss_coefficient = 1) and dead window: a latent
  /// is dead after more than dead_feature_window = 1000 steps without firing, i.e. 1001
  /// batches.
  void use_saelens_auxk() {
    aux_form = AuxKForm::saelens;
    aux_coef = 1;
    aux_dead_batches = 1001;
  }
};

}  // namespace mxd::train
