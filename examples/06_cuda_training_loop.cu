// SPDX-License-Identifier: MIT
// 06: example 04's training loop on the GPU. Only the device tag and the copies change:
// the batch goes to the device, the loss is computed there, and the trained parameters come
// back to the host at the end. Exits 77 (reported as skipped) where no GPU is visible, 1 with
// the message where the driver is broken or anything else throws mxd::Error.
#include <cstdio>

#include <mxd/cuda.cuh>
#include <mxd/init.hpp>
#include <mxd/train/data.hpp>

int main() try {
  if (mxd::cuda_device_count() == 0) {
    std::printf("skipped: no CUDA device is visible\n");
    return 77;
  }
  mxd::Config cfg;
  cfg.d_in = 16; cfg.d_hidden = 64; cfg.d_out = 16; cfg.n_experts = 256; cfg.k = 8;
  cfg.activation = mxd::Activation::gelu;

  mxd::Params<float> host(cfg);
  mxd::init_params(host, /*seed=*/0);
  mxd::Params<float, mxd::cuda> params = mxd::to_device(host);   // the one copy of the weights
  mxd::Grads<float, mxd::cuda> grads(cfg);
  mxd::Workspace<float, mxd::cuda> ws;                          // stream, cuBLAS handle, cache
  mxd::AdamWConfig oc;
  oc.lr = 3e-3;
  oc.warmup_steps = 20;
  mxd::AdamW<float, mxd::cuda> opt(params, oc);
  mxd::train::Teacher<float> teacher(16, 64, 16, /*seed=*/1, /*eval_rows=*/0);

  const mxd::index_t B = 128, steps = 300;
  mxd::Tensor<float> x, target;                                 // host batches
  mxd::Tensor<float, mxd::cuda> xd(B, cfg.d_in), td(B, cfg.d_out), y(B, cfg.d_out), dy(B, cfg.d_out);
  double first = 0, last = 0;
  for (mxd::index_t step = 0; step < steps; ++step) {
    teacher.train_batch(step, B, x, target);
    mxd::copy_to_device<float>(x.view(), xd.view());            // x: [B, I]
    mxd::copy_to_device<float>(target.view(), td.view());       // target: [B, O]
    mxd::forward(params, xd.view(), y.view(), ws);
    const double loss = mxd::loss(ws.ctx, mxd::Loss::nmse_ref, y.view(), td.view(), dy.view());
    mxd::backward(params, xd.view(), dy.view(), ws, grads);
    mxd::project_decoder_grads(params, grads, ws.ctx);
    opt.step(params, grads, ws.ctx);
    mxd::normalize_decoder(params, ws.ctx);
    if (step == 0) first = loss;
    if (step >= steps - 10) last += loss / 10;
    if (step % 50 == 0) std::printf("step %4lld  loss %.5f\n", (long long)step, loss);
  }
  host = mxd::to_host(params);                                  // e.g. for io::save_checkpoint
  std::printf("loss %.5f -> %.5f\n", first, last);
  const bool ok = last < first / 4;
  std::printf("%s\n", ok ? "ok: the loop learns on the GPU" : "FAILED: loss did not fall 4x");
  return ok ? 0 : 1;
} catch (const mxd::Error& e) {
  std::printf("FAILED: %s\n", e.what());
  return 1;
}
