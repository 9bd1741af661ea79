// SPDX-License-Identifier: MIT
// 02: every MxD expert is full rank (the rank of D), while a TopK transcoder latent is rank 1.
//
// A transcoder latent m maps x to (x . e_m) d_m: the outer product e_m d_m^T has rank 1.
// An MxD expert W_n = D diag(c_n) keeps the rank of D whenever c_n has no zero entry, so
// sparsity does not cost expressiveness: each of the k active experts is a full linear map.
// This program measures both ranks with a rank-revealing QR.
#include <cstdio>
#include <random>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/init.hpp>
#include <mxd/interp/experts.hpp>
#include <mxd/mxd.hpp>

int main() {
  mxd::Config cfg;
  cfg.d_in = 32; cfg.d_hidden = 48; cfg.d_out = 24; cfg.n_experts = 64; cfg.k = 4;
  mxd::Params<double> p(cfg);
  mxd::init_params(p, 1);
  std::mt19937_64 rng(2);
  std::normal_distribution<double> normal(0, 1);
  for (mxd::index_t i = 0; i < p.D.size(); ++i) p.D[i] = normal(rng);  // a trained-like D

  mxd::Tensor<double> D(cfg.d_hidden, cfg.d_out);
  for (mxd::index_t i = 0; i < D.size(); ++i) D[i] = p.D[i];
  const mxd::index_t rank_D = mxd::interp::rank(D);
  std::printf("rank(D) = %lld of min(H, O) = %lld\n", (long long)rank_D,
              (long long)std::min(cfg.d_hidden, cfg.d_out));
  bool ok = rank_D == std::min(cfg.d_hidden, cfg.d_out);
  for (mxd::index_t n : {0, 7, 31, 63}) {
    const mxd::index_t r = mxd::interp::rank(mxd::interp::expert_weight(p, n));
    std::printf("  MxD expert %2lld: rank(D diag(c_n)) = %lld\n", (long long)n, (long long)r);
    ok = ok && r == rank_D;
  }

  mxd::TranscoderParams<double> tc(mxd::TranscoderConfig{cfg.d_in, cfg.d_out, 256, cfg.k, false});
  mxd::init_transcoder(tc, 3);
  for (mxd::index_t m : {0, 100, 255}) {
    mxd::Tensor<double> map(cfg.d_in, cfg.d_out);  // e_m d_m^T: latent m's contribution to y
    for (mxd::index_t i = 0; i < cfg.d_in; ++i)
      for (mxd::index_t o = 0; o < cfg.d_out; ++o) map(i, o) = tc.W_enc(m, i) * tc.W_dec(m, o);
    const mxd::index_t r = mxd::interp::rank(map);
    std::printf("  transcoder latent %3lld: rank(e_m d_m^T) = %lld\n", (long long)m, (long long)r);
    ok = ok && r == 1;
  }
  std::printf("%s\n", ok ? "ok: experts are full rank, latents are rank 1" : "FAILED");
  return ok ? 0 : 1;
}
