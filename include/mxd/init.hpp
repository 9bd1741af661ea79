// SPDX-License-Identifier: MIT
/// @file init.hpp
/// @brief The authors' initialisation of an MxD layer, and the parameter-matched expert count.
///
///     mxd::Params<float> p(cfg);
///     mxd::init_params(p, /*seed=*/0);        // E, G, W_glu as nn.Linear; D = 0; c_n unit norm
///     cfg.n_experts = mxd::matched_experts(768, 3072, 768, 32);   // 21504 for GPT-2 small
#pragma once

#include <cmath>
#include <cstdint>
#include <random>

#include "config.hpp"
#include "params.hpp"

namespace mxd {

namespace detail {

// Uniform(lo, hi) from 53 random bits: the same values on every platform and compiler.
inline double uniform(std::mt19937_64& rng, double lo, double hi) {
  return lo + (hi - lo) * static_cast<double>(rng() >> 11) * 0x1p-53;
}

template <class T>
void fill_uniform(Tensor<T>& t, std::mt19937_64& rng, double bound) {
  for (index_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(uniform(rng, -bound, bound));
}

}  // namespace detail

/// Initialises `p` as the authors' MxD (host memory):
///   E (W_enc), G (gate), W_glu and b_glu like nn.Linear(d_in, .): uniform(+-1/sqrt(d_in));
///   b_enc, b_gate, b_out = 0; D (W_dec) = 0 and W_skip = 0, following skip transcoders;
///   with norm_dec each c_n uniform(-1, 1) then unit norm, else like nn.Linear(N, d_out).
template <class T>
void init_params(Params<T>& p, std::uint64_t seed, bool norm_dec = true) {
  const Config& c = p.config;
  std::mt19937_64 rng(seed);
  const double b_in = 1.0 / std::sqrt(static_cast<double>(c.d_in));
  p.set_zero();
  detail::fill_uniform(p.E, rng, b_in);
  detail::fill_uniform(p.G, rng, b_in);
  detail::fill_uniform(p.C, rng, norm_dec ? 1.0 : 1.0 / std::sqrt(static_cast<double>(c.n_experts)));
  if (norm_dec) {
    for (index_t n = 0; n < c.n_experts; ++n) {
      double sq = 0;
      for (index_t o = 0; o < c.d_out; ++o) sq += double(p.C(n, o)) * double(p.C(n, o));
      const double inv = 1.0 / std::sqrt(sq);
      for (index_t o = 0; o < c.d_out; ++o) p.C(n, o) = static_cast<T>(double(p.C(n, o)) * inv);
    }
  }
  if (c.glu) {
    detail::fill_uniform(p.W_glu, rng, b_in);
    detail::fill_uniform(p.b_glu, rng, b_in);
  }
}

/// How the parameter-matched expert count treats the transcoder's bias.
enum class MatchConvention {
  design,   // P_base counts b_enc with its width H: 21504 experts for GPT-2 small
  authors,  // the authors' script counts the transcoder's bias width M where H belongs: 21490
};

/// Number of experts N whose MxD (I -> H -> O) has as many parameters as a TopK transcoder of
/// M = m I latents (encoder I x M, bias M, decoder M x O, output bias O):
///
///     N = floor((P_tc - P_base) / (I + O + 1))
///     P_tc   = I M + M + M O + O                              (= 2 I (m I) + m I + O for I = O)
///     P_base = I H + H + H O + O  (+ H I + H with GLU, + O I with skip)
///
/// P_base is the MxD's parameter count without G [N, I], b_gate [N] and C [N, O], which add
/// I + 1 + O per expert. GPT-2 small (I = O = 768, H = 3072, m = 32) gives 21504.
inline index_t matched_experts(index_t I, index_t H, index_t O, index_t m, bool glu = false,
                               bool skip = false, MatchConvention conv = MatchConvention::design) {
  MXD_CHECK(I > 0 && H > 0 && O > 0 && m > 0, "matched_experts: sizes must be positive (I = ", I,
            ", H = ", H, ", O = ", O, ", m = ", m, ")");
  const index_t M = m * I;
  const index_t p_tc = I * M + M * O + M + O;
  const index_t h = conv == MatchConvention::design ? H : M;
  index_t p_base = I * H + h + H * O + O;
  if (glu) p_base += H * I + H;
  if (skip) p_base += O * I;
  MXD_CHECK(p_tc > p_base, "matched_experts: a transcoder of ", M, " latents has ", p_tc,
            " parameters, fewer than the MxD's dense part (", p_base, ")");
  return (p_tc - p_base) / (I + O + 1);
}

}  // namespace mxd
