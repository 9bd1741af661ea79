// SPDX-License-Identifier: MIT
// The baseline's training pieces (issue 23): gradient clipping by global norm
// (train/clip.hpp) against torch's rule, the exact parameter match by latent count and the
// tied initialisation (train/baseline.hpp), SAELens's ranking by decoder norm
// (baselines/transcoder.hpp), and their error messages.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/train/baseline.hpp>
#include <mxd/train/clip.hpp>

#include "testing.hpp"

using namespace mxd;
using mxd_test::random_matrix;
using mxd_test::rel_error;

TEST_CASE("clip_grad_norm scales every gradient by max_norm / (norm + 1e-6) when above it") {
  TranscoderParams<double> g(TranscoderConfig{3, 3, 4, 2, true});
  double sq = 0;
  int i = 0;
  g.for_each([&](const char*, Tensor<double>& t) {
    for (index_t j = 0; j < t.size(); ++j) {
      t[j] = 0.5 * ((i++ % 7) - 3);
      sq += t[j] * t[j];
    }
  });
  const double norm = std::sqrt(sq);
  TranscoderParams<double> before = g;
  Context<cpu> ctx;
  CHECK(train::clip_grad_norm(ctx, g, 1.0) == doctest::Approx(norm).epsilon(1e-12));
  double after = 0;
  g.for_each([&](const char*, Tensor<double>& t) {
    for (index_t j = 0; j < t.size(); ++j) after += t[j] * t[j];
  });
  CHECK(std::sqrt(after) == doctest::Approx(norm / (norm + 1e-6)).epsilon(1e-12));
  CHECK(g.W_skip[0] == doctest::Approx(before.W_skip[0] / (norm + 1e-6)).epsilon(1e-12));
  // Below max_norm: unchanged, bit for bit.
  TranscoderParams<double> small = before;
  train::clip_grad_norm(ctx, small, 2 * norm);
  CHECK(std::memcmp(small.W_enc.data(), before.W_enc.data(), before.W_enc.bytes()) == 0);
  CHECK_THROWS_WITH_AS(train::clip_grad_norm(ctx, small, 0.0), "clip_grad_norm: max_norm = 0 must be finite and > 0",
                       Error);
}

TEST_CASE("the clipping norm and the clipped gradients are the same bits for 1 and 4 threads") {
  // 20,000 x 8 values: ten of sum_squares' fixed chunks, so the threads share the sum.
  TranscoderParams<float> g(TranscoderConfig{8, 8, 20000, 4, false});
  std::uint64_t seed = 3;
  g.for_each([&](const char*, Tensor<float>& t) { t = mxd_test::random_matrix<float>(t.rows(), t.cols(), seed++); });
  TranscoderParams<float> g4 = g;
  Context<cpu> one, four;
  one.threads = 1;
  four.threads = 4;
  const double n1 = train::clip_grad_norm(one, g, 1.0), n4 = train::clip_grad_norm(four, g4, 1.0);
  CHECK(n1 > 1.0);
  CHECK(std::memcmp(&n1, &n4, sizeof n1) == 0);
  g.for_each([&](const char* name, Tensor<float>& t) {
    g4.for_each([&](const char* n2, Tensor<float>& u) {
      if (std::strcmp(name, n2) == 0) CHECK(std::memcmp(t.data(), u.data(), t.bytes()) == 0);
    });
  });
}

TEST_CASE("experts_for_latents matches like for like, exactly when M = N + H") {
  for (bool skip : {false, true}) {
    const index_t n = train::experts_for_latents(64, 256, 64, 2048, false, skip);
    CHECK(n == 2048 - 256);
    Config c;
    c.d_in = c.d_out = 64;
    c.d_hidden = 256;
    c.n_experts = n;
    c.skip = skip;
    CHECK(c.n_params() == TranscoderConfig({64, 64, 2048, 1, skip}).n_params());
  }
  CHECK(train::experts_for_latents(64, 256, 64, 2048) == matched_experts(64, 256, 64, 32));
  // Not divisible: the nearest count (GLU adds H I + H = 16640, 128.99 experts' worth).
  Config g;
  g.d_in = g.d_out = 64;
  g.d_hidden = 256;
  g.glu = true;
  g.n_experts = train::experts_for_latents(64, 256, 64, 2048, true);
  const index_t p_tc = TranscoderConfig{64, 64, 2048, 1, false}.n_params();
  for (index_t other : {g.n_experts - 1, g.n_experts + 1}) {
    Config h = g;
    h.n_experts = other;
    CHECK(std::llabs(g.n_params() - p_tc) <= std::llabs(h.n_params() - p_tc));
  }
  CHECK_THROWS_AS(train::experts_for_latents(64, 256, 64, 10), Error);
}

TEST_CASE("init_transcoder_tied: decoder rows of norm 0.1, encoder its transpose, biases 0") {
  TranscoderParams<float> p(TranscoderConfig{8, 8, 16, 2, true});
  train::init_transcoder_tied(p, 3);
  for (index_t m = 0; m < 16; ++m) {
    double sq = 0;
    for (index_t o = 0; o < 8; ++o) {
      sq += double(p.W_dec(m, o)) * double(p.W_dec(m, o));
      CHECK(p.W_enc(m, o) == p.W_dec(m, o));
    }
    CHECK(std::sqrt(sq) == doctest::Approx(0.1).epsilon(1e-6));
    CHECK(p.b_enc[m] == 0.0f);
  }
  for (index_t i = 0; i < p.W_skip.size(); ++i) CHECK(p.W_skip[i] == 0.0f);
  TranscoderParams<float> q(TranscoderConfig{8, 4, 16, 2, false});
  CHECK_THROWS_AS(train::init_transcoder_tied(q, 3), Error);
}

TEST_CASE("rank_by_decoder_norm selects by relu(pre) |W_dec[m]|, keeps relu(pre), and folds "
          "into a plain transcoder with the same output") {
  // Latent 0 has the larger pre-activation, latent 1 the larger product with its decoder
  // norm: the plain transcoder keeps 0, the ranked one keeps 1, with value relu(pre_1).
  TranscoderParams<double> p(TranscoderConfig{2, 2, 3, 1, false});
  p.W_enc.set_zero();
  p.W_enc(0, 0) = 2.0;   // pre_0 = 2 x_0
  p.W_enc(1, 0) = 1.0;   // pre_1 = x_0
  p.W_enc(2, 0) = -1.0;  // pre_2 < 0: never
  p.W_dec.set_zero();
  p.W_dec(0, 0) = 1.0;   // |W_dec[0]| = 1
  p.W_dec(1, 1) = 3.0;   // |W_dec[1]| = 3
  p.W_dec(2, 0) = 10.0;
  p.b_out[0] = 0.5;
  Tensor<double> x(1, 2), y(1, 2);
  x[0] = 1.5;
  x[1] = -4.0;
  TranscoderWorkspace<double> ws;
  transcoder_forward(p, x.view(), y.view(), ws);
  CHECK(ws.topk_idx[0] == 0);
  CHECK(ws.topk_val[0] == 3.0);
  p.config.rank_by_decoder_norm = true;
  transcoder_forward(p, x.view(), y.view(), ws);
  CHECK(ws.topk_idx[0] == 1);
  CHECK(ws.topk_val[0] == 1.5);               // relu(pre_1), not relu(pre_1) * 3
  CHECK(y[0] == 0.5);
  CHECK(y[1] == 4.5);                          // 1.5 * W_dec[1] (its norm not divided out)

  // Folding, on random weights and many rows: the same selection and output, a plain file.
  TranscoderParams<double> q(TranscoderConfig{6, 6, 40, 4, false, true});
  index_t seed = 3;
  q.for_each([&](const char*, Tensor<double>& t) { t = random_matrix<double>(t.rows(), t.cols(), seed++); });
  for (index_t m = 0; m < 40; ++m)  // decoder norms spread over 0.1 .. 4
    for (index_t o = 0; o < 6; ++o) q.W_dec(m, o) *= 0.1 + 0.1 * double(m);
  const Tensor<double> xs = random_matrix<double>(50, 6, 9);
  Tensor<double> y_ranked(50, 6), y_folded(50, 6);
  TranscoderWorkspace<double> w1, w2;
  const auto same_selection = [&] {
    return std::equal(w1.topk_idx.data(), w1.topk_idx.data() + w1.topk_idx.size(), w2.topk_idx.data());
  };
  transcoder_forward(q, xs.view(), y_ranked.view(), w1);
  TranscoderParams<double> folded = q;
  fold_decoder_norm(folded);
  CHECK(!folded.config.rank_by_decoder_norm);
  transcoder_forward(folded, xs.view(), y_folded.view(), w2);
  CHECK(same_selection());
  CHECK(rel_error(y_folded.data(), y_ranked.data(), y_ranked.size()) <= 1e-14);  // double rounding
  // And the ranking did matter here: the plain rule picks other latents.
  TranscoderParams<double> plain = q;
  plain.config.rank_by_decoder_norm = false;
  transcoder_forward(plain, xs.view(), y_folded.view(), w2);
  CHECK(!same_selection());
}
