// SPDX-License-Identifier: MIT
// The only translation unit of the CUDA tests that nvcc compiles: see runs.hpp.
#include "runs.hpp"

#include <mxd/cuda.cuh>
#include <mxd/train/aux_loss.cuh>
#include <mxd/train/step.hpp>

// The backend contract (backend.hpp): every primitive with its signature, on the GPU.
static_assert(mxd::backend_contract_holds<mxd::cuda, float>() &&
              mxd::backend_contract_holds<mxd::cuda, double>());

namespace mxd_cuda_test {

using namespace mxd;
using mxd::cuda;  // CCCL also declares a namespace ::cuda

int device_count() { return cuda_device_count(); }

int device_count_verdict(int status, int count, int driver_version) {
  return detail::device_count_verdict(static_cast<cudaError_t>(status), count, driver_version);
}

std::string impossible_allocation_error() {
  try {
    memory<cuda>::deallocate(memory<cuda>::allocate(std::size_t(1) << 62));
  } catch (const Error& e) {
    return e.what();
  }
  return "<no mxd::Error>";
}

template <class T>
LayerResult<T> layer(const Params<T>& hp, const Tensor<T>& hx, const Tensor<T>& hdy,
                     const LayerOptions& options) {
  Params<T, cuda> p = to_device(hp);
  Grads<T, cuda> g(hp.config);
  Tensor<T, cuda> x = to_device(hx), dy = to_device(hdy);
  Tensor<T, cuda> y(hx.rows(), hp.config.d_out), dx(hx.rows(), hp.config.d_in);
  Workspace<T, cuda> ws;
  ws.ctx.math = options.bf16 ? MathMode::bf16 : options.tf32 ? MathMode::tf32 : MathMode::fp32;
  forward<T>(p, x.view(), y.view(), ws, options.steering);
  backward<T>(p, x.view(), dy.view(), ws, g, dx.view());
  if (options.accumulate_twice) backward<T>(p, x.view(), dy.view(), ws, g, dx.view(), GradMode::Accumulate);
  ws.ctx.synchronize();
  LayerResult<T> r{to_host(y), to_host(dx), to_host(g), to_host(ws.topk_idx), to_host(ws.topk_val),
                   to_host(ws.coef)};
  return r;
}

template <class T>
TranscoderResult<T> transcoder(const TranscoderParams<T>& hp, const Tensor<T>& hx,
                               const Tensor<T>& hdy) {
  TranscoderParams<T, cuda> p = to_device(hp), g(hp.config);
  Tensor<T, cuda> x = to_device(hx), dy = to_device(hdy);
  Tensor<T, cuda> y(hx.rows(), hp.config.d_out), dx(hx.rows(), hp.config.d_in);
  TranscoderWorkspace<T, cuda> ws;
  transcoder_forward<T>(p, x.view(), y.view(), ws);
  transcoder_backward<T>(p, x.view(), dy.view(), ws, g, dx.view());
  ws.ctx.synchronize();
  return {to_host(y), to_host(dx), to_host(g)};
}

template <class T>
TrainResult<T> train(const Params<T>& hp, const std::vector<Tensor<T>>& inputs,
                     const std::vector<Tensor<T>>& targets, const AdamWConfig& oc,
                     const mxd::train::StepOptions& options) {
  mxd::train::Trainer<Params<T, cuda>> m(to_device(hp), oc, options);
  std::vector<double> losses, aux_losses;
  Tensor<T, cuda> x, t;
  for (std::size_t step = 0; step < inputs.size(); ++step) {
    x = to_device(inputs[step]);
    t = to_device(targets[step]);
    losses.push_back(mxd::train::step(m, x.view(), t.view()));
    aux_losses.push_back(m.aux_loss);
  }
  m.ws.ctx.synchronize();
  Params<T> host = to_host(m.p);
  AdamW<T> host_opt = to_host(m.opt, host);
  return {std::move(host), std::move(host_opt), std::move(losses), std::move(aux_losses), m.dead};
}

template <class T>
double loss(Loss kind, const Tensor<T>& hy, const Tensor<T>& ht, Tensor<T>& hdy) {
  Context<cuda> ctx;
  Tensor<T, cuda> y = to_device(hy), t = to_device(ht), dy(hy.rows(), hy.cols());
  const double l = loss<T>(ctx, kind, y.view(), t.view(), dy.view());
  hdy = to_host(dy);
  return l;
}

template <class T>
void gate_topk(Tensor<T>& hscores, const Tensor<T>& hb, index_t k, Tensor<std::int32_t>& hidx,
               Tensor<T>& hval, index_t pad, bool relu) {
  const index_t B = hscores.rows();
  Tensor<std::int32_t> fill_idx(B, k + pad);
  Tensor<T> fill_val(B, k + pad);
  for (index_t i = 0; i < fill_idx.size(); ++i) {
    fill_idx[i] = -7;
    fill_val[i] = T(-7);
  }
  Context<cuda> ctx;
  Tensor<T, cuda> scores = to_device(hscores), b = to_device(hb), val = to_device(fill_val);
  Tensor<std::int32_t, cuda> idx = to_device(fill_idx);
  backend<cuda>::gate_topk<T>(ctx, scores.view(), b.view(), k,
                              View<std::int32_t, cuda>(idx.data(), B, k, k + pad),
                              View<T, cuda>(val.data(), B, k, k + pad), 0, relu);
  ctx.synchronize();
  hscores = to_host(scores);
  hidx = to_host(idx);
  hval = to_host(val);
}

template <class T>
std::vector<std::string> gate_topk_errors(const std::vector<Tensor<T>>& batches,
                                          const Tensor<T>& hb, index_t k, bool sync_each) {
  Context<cuda> ctx;
  const Tensor<T, cuda> b = to_device(hb);
  std::vector<std::string> errors;
  auto sync = [&] {
    try {
      ctx.synchronize();
      errors.emplace_back();
    } catch (const Error& e) {
      errors.emplace_back(e.what());
    }
  };
  Tensor<T, cuda> scores, val;
  Tensor<std::int32_t, cuda> idx;
  for (const Tensor<T>& batch : batches) {
    scores = to_device(batch);
    val.resize(batch.rows(), k, false);
    idx.resize(batch.rows(), k, false);
    backend<cuda>::gate_topk<T>(ctx, scores.view(), b.view(), k, idx.view(), val.view());
    if (sync_each) sync();
  }
  if (!sync_each) sync();
  return errors;
}

void group_by_expert(const Tensor<std::int32_t>& hidx, index_t N, Tensor<std::int32_t>& horder,
                     Tensor<std::int32_t>& hoffsets) {
  Context<cuda> ctx;
  Tensor<std::int32_t, cuda> idx = to_device(hidx), order(1, hidx.size()), offsets(1, N + 1);
  backend<cuda>::group_by_expert(ctx, idx.view(), N, order.view(), offsets.view());
  ctx.synchronize();
  horder = to_host(order);
  hoffsets = to_host(offsets);
}

template <class T>
void gemm(bool ta, bool tb, T alpha, const Tensor<T>& hA, index_t ar, index_t ac,
          const Tensor<T>& hB, index_t br, index_t bc, T beta, Tensor<T>& hC, index_t cr,
          index_t cc, Math math) {
  Context<cuda> ctx;
  ctx.math = math == Math::bf16 ? MathMode::bf16 : math == Math::tf32 ? MathMode::tf32 : MathMode::fp32;
  Tensor<T, cuda> A = to_device(hA), B = to_device(hB), C = to_device(hC);
  backend<cuda>::gemm<T>(ctx, ta, tb, alpha, View<const T, cuda>(A.data(), ar, ac, A.cols()),
                         View<const T, cuda>(B.data(), br, bc, B.cols()), beta,
                         View<T, cuda>(C.data(), cr, cc, C.cols()));
  ctx.synchronize();
  hC = to_host(C);
}

template <class T>
void norm_dec(Tensor<T>& hC, Tensor<T>& hg) {
  Context<cuda> ctx;
  Tensor<T, cuda> C = to_device(hC), g = to_device(hg);
  backend<cuda>::remove_parallel_rows<T>(ctx, C.view(), g.view());
  backend<cuda>::normalize_rows<T>(ctx, C.view());
  ctx.synchronize();
  hC = to_host(C);
  hg = to_host(g);
}

template <class T>
double clip_grad_norm(TranscoderParams<T>& hg, double max_norm) {
  Context<cuda> ctx;
  TranscoderParams<T, cuda> g = to_device(hg);
  const double norm = mxd::train::clip_grad_norm(ctx, g, max_norm);
  ctx.synchronize();
  hg = to_host(g);
  return norm;
}

template <class T>
Params<T> round_trip(const Params<T>& p) {
  return to_host(to_device(p));
}

template <class T>
AdamW<T> round_trip(const AdamW<T>& opt, const Params<T>& p) {
  Params<T, cuda> dp = to_device(p);
  return to_host(to_device(opt, dp), p);
}

template <class T>
index_t find_non_finite(const Tensor<T>& v) {
  Context<cuda> ctx;
  const Tensor<T, cuda> d = to_device(v);
  return backend<cuda>::find_non_finite<T>(ctx, d.view());
}

template <class T>
std::string adamw_step_error(const Params<T>& p, const Params<T>& g) {
  Params<T, cuda> dp = to_device(p);
  const Params<T, cuda> dg = to_device(g);
  AdamW<T, cuda> opt(dp, AdamWConfig{});
  Context<cuda> ctx;
  try {
    opt.step(dp, dg, ctx);
  } catch (const mxd::Error& e) {
    return e.what();
  }
  return "";
}

#define MXD_INSTANTIATE(T)                                                                    \
  template LayerResult<T> layer<T>(const Params<T>&, const Tensor<T>&, const Tensor<T>&,       \
                                   const LayerOptions&);                                       \
  template TrainResult<T> train<T>(const Params<T>&, const std::vector<Tensor<T>>&,            \
                                   const std::vector<Tensor<T>>&, const AdamWConfig&,          \
                                   const mxd::train::StepOptions&);                            \
  template TranscoderResult<T> transcoder<T>(const TranscoderParams<T>&, const Tensor<T>&,     \
                                             const Tensor<T>&);                                \
  template double loss<T>(Loss, const Tensor<T>&, const Tensor<T>&, Tensor<T>&);               \
  template void gate_topk<T>(Tensor<T>&, const Tensor<T>&, index_t, Tensor<std::int32_t>&,     \
                             Tensor<T>&, index_t, bool);                                       \
  template std::vector<std::string> gate_topk_errors<T>(const std::vector<Tensor<T>>&,         \
                                                        const Tensor<T>&, index_t, bool);      \
  template void gemm<T>(bool, bool, T, const Tensor<T>&, index_t, index_t, const Tensor<T>&,   \
                        index_t, index_t, T, Tensor<T>&, index_t, index_t, Math);              \
  template void norm_dec<T>(Tensor<T>&, Tensor<T>&);                                           \
  template double clip_grad_norm<T>(TranscoderParams<T>&, double);                             \
  template index_t find_non_finite<T>(const Tensor<T>&);                                       \
  template std::string adamw_step_error<T>(const Params<T>&, const Params<T>&);                \
  template Params<T> round_trip<T>(const Params<T>&);                                          \
  template AdamW<T> round_trip<T>(const AdamW<T>&, const Params<T>&);
MXD_INSTANTIATE(float)
MXD_INSTANTIATE(double)
#undef MXD_INSTANTIATE

}  // namespace mxd_cuda_test
