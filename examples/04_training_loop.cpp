// SPDX-License-Identifier: MIT
// 04: a custom training loop with the public API: forward, loss, backward, AdamW (+ norm_dec).
//
// Learns a small teacher MLP. Everything `mxd train` does per step is here in a few lines;
// swap the teacher for your own data and the loop stays the same. train::step
// (<mxd/train/step.hpp>) makes exactly these calls, plus AuxK and a gradient sum across
// processes when asked: use it once the steps are clear.
#include <cstdio>

#include <mxd/init.hpp>
#include <mxd/mxd.hpp>
#include <mxd/train/data.hpp>

int main() {
  mxd::Config cfg;
  cfg.d_in = 16; cfg.d_hidden = 64; cfg.d_out = 16; cfg.n_experts = 256; cfg.k = 8;
  cfg.activation = mxd::Activation::gelu;

  mxd::Params<float> params(cfg);
  mxd::init_params(params, /*seed=*/0);          // the authors' initialisation
  mxd::Grads<float> grads(cfg);
  mxd::Workspace<float> ws;                       // reused every step: no allocation after the first
  mxd::AdamWConfig oc;
  oc.lr = 3e-3;
  oc.warmup_steps = 20;
  mxd::AdamW<float> opt(params, oc);
  mxd::train::Teacher<float> teacher(16, 64, 16, /*seed=*/1, /*eval_rows=*/0);

  const mxd::index_t B = 128, steps = 300;
  mxd::Tensor<float> x, target, y(B, cfg.d_out), dy(B, cfg.d_out);
  double first = 0, last = 0;
  for (mxd::index_t step = 0; step < steps; ++step) {
    teacher.train_batch(step, B, x, target);                      // x: [B, I], target: [B, O]
    mxd::forward(params, x.view(), y.view(), ws);                 // y = MxD(x)
    const double loss = mxd::loss<float>(mxd::Loss::nmse_ref, y.view(), target.view(), dy.view());
    mxd::backward(params, x.view(), dy.view(), ws, grads);        // grads = dL/dparams
    mxd::project_decoder_grads(params, grads, ws.ctx);             // norm_dec, before the step
    opt.step(params, grads, ws.ctx);
    mxd::normalize_decoder(params, ws.ctx);                       // norm_dec, after the step
    if (step == 0) first = loss;
    if (step >= steps - 10) last += loss / 10;
    if (step % 50 == 0) std::printf("step %4lld  loss %.5f\n", (long long)step, loss);
  }
  std::printf("loss %.5f -> %.5f\n", first, last);
  const bool ok = last < first / 4;
  std::printf("%s\n", ok ? "ok: the loop learns" : "FAILED: loss did not fall 4x");
  return ok ? 0 : 1;
}
