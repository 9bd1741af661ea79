// SPDX-License-Identifier: MIT
/// @file train/step.hpp
/// @brief One training step, written once for every model (the MxD, the TopK and skip
/// transcoders) and every device: forward, the loss, the NaN/Inf check, backward, AuxK, the
/// gradient sum across processes, norm_dec and AdamW.
///
///     mxd::train::Trainer<mxd::Params<float>> m(std::move(params), adamw_config);
///     m.options.aux.k = 32;                            // AuxK on (off by default)
///     double l = mxd::train::step(m, x, target);       // x: [B, I], target: [B, O]
///
/// A distributed run passes a Reducer (parallel/step.hpp) that sums the loss and the
/// gradients over the processes and, for sharded experts, runs forward and backward its way.
#pragma once

#include <cmath>
#include <functional>
#include <type_traits>
#include <utility>

#include "../baselines/transcoder.hpp"
#include "../layer.hpp"
#include "../loss.hpp"
#include "../optim.hpp"
#include "aux_loss.hpp"
#include "clip.hpp"
#include "dead_units.hpp"

namespace mxd::train {

/// What a step does besides forward, backward and the AdamW update.
struct StepOptions {
  Loss loss = Loss::nmse_ref;  // the training loss (the authors': nmse_ref)
  bool norm_dec = true;        // decoder rows kept at unit norm (normalize_decoder)
  AuxK aux;                    // the AuxK loss for dead units (off unless aux.k > 0)
  double clip_grad = 0;        // clip the gradient to this global L2 norm (0: off)
};

/// The workspace a parameter set trains with.
template <class Set>
struct workspace_of;
template <class T, class Device>
struct workspace_of<Params<T, Device>> {
  using type = Workspace<T, Device>;
};
template <class T, class Device>
struct workspace_of<TranscoderParams<T, Device>> {
  using type = TranscoderWorkspace<T, Device>;
};

/// One model in training on one device: parameters, gradients, workspace, AdamW state, the
/// dead-unit tracker (with AuxK) and the step's output.
template <class Set>
struct Trainer;
template <template <class, class> class SetT, class T, class Device>
struct Trainer<SetT<T, Device>> {
  using Set = SetT<T, Device>;
  using Scalar = T;
  using device = Device;

  Trainer(Set params, const AdamWConfig& oc, StepOptions so = {})
      : p(std::move(params)), g(p.config), opt(p, oc), options(std::move(so)) {
    if (options.aux.enabled()) dead = DeadUnits(units(), options.aux.dead_window);
  }

  /// Experts of an MxD, latents of a transcoder: what dead-unit tracking counts.
  index_t units() const {
    if constexpr (std::is_same_v<Set, Params<T, Device>>) return p.config.n_experts;
    else return p.config.n_latents;
  }

  Set p, g;
  typename workspace_of<Set>::type ws;
  AdamW<T, Device, Set> opt;
  StepOptions options;
  DeadUnits dead;               // with options.aux: tokens since each unit was selected
  AuxKWorkspace<T, Device> aux_ws;
  Tensor<T, Device> pred, dy;   // [B, O] the last step's output and dL/dpred
  double aux_loss = 0;          // L_aux of the last step (0 without AuxK)
  Tensor<std::int32_t> host_idx;  // the selection on the host, for DeadUnits (devices only)
  Tensor<T> host_val;
};

/// How a step meets the other processes of a distributed run; the defaults are one process.
template <class Model>
struct Reducer {
  using T = typename Model::Scalar;
  using D = typename Model::device;
  virtual ~Reducer() = default;
  /// Rows of the whole batch the loss is a mean over (0: the rows given to step()).
  virtual index_t batch_rows() const { return 0; }
  virtual void forward(Model& m, InView<T, D> x, View<T, D> y) { mxd::forward(m.p, x, y, m.ws); }
  virtual void backward(Model& m, InView<T, D> x, InView<T, D> dy) {
    mxd::backward(m.p, x, dy, m.ws, m.g);
  }
  /// The whole batch's loss from this process's share; a non-finite one stops every process.
  virtual double loss(double share) { return share; }
  /// Sums this batch's gradients over the processes.
  virtual void gradients(Model&) {}
  /// Sums n values in place over the processes (AuxK's batch statistics); none for one.
  virtual train::SumAcross sum_across() { return {}; }
  /// Records the batch's selection in the dead-unit tracker (every process's rows, in order).
  /// idx, val: [rows, k] of this process, on the host.
  virtual void record(DeadUnits& dead, ConstView<std::int32_t> idx, View<T> val) {
    dead.record(idx, val);
  }
  /// Runs the optimizer update (a distributed run stops every process on its error).
  virtual void update(const std::function<void()>& f) { f(); }
};

/// One training step on (x, target); returns the loss before the update. A non-finite loss
/// stops before backward, a non-finite gradient before any weight changes (AdamW), on every
/// device. x: [B, I], target: [B, O] on the model's device.
template <class Model>
double step(Model& m, InView<typename Model::Scalar, typename Model::device> x,
            InView<typename Model::Scalar, typename Model::device> target, Reducer<Model>& r) {
  using T = typename Model::Scalar;
  using D = typename Model::device;
  const StepOptions& o = m.options;
  auto& ctx = m.ws.ctx;
  m.pred.resize(x.rows, target.cols, false);
  m.dy.resize(x.rows, target.cols, false);
  r.forward(m, x, m.pred.view());
  double l = loss<T>(ctx, o.loss, m.pred.view(), target, m.dy.view(), r.batch_rows());
  l = r.loss(l);
  MXD_CHECK(std::isfinite(l), "the loss became ", l, " (no weight was updated)");
  r.backward(m, x, m.dy.view());
  m.aux_loss = 0;
  if (o.aux.enabled()) {
    m.aux_loss = auxk_backward(m.p, x, InView<T, D>(m.pred.view()), target, m.ws, m.dead, o.aux,
                               m.aux_ws, m.g, r.sum_across());
    if constexpr (std::is_same_v<D, cpu>) {
      r.record(m.dead, m.ws.topk_idx.view(), m.ws.topk_val.view());
    } else {
      m.host_idx.resize(m.ws.topk_idx.rows(), m.ws.topk_idx.cols(), false);
      m.host_val.resize(m.ws.topk_val.rows(), m.ws.topk_val.cols(), false);
      memory<D>::download(m.host_idx.data(), m.ws.topk_idx.data(), m.host_idx.bytes());
      memory<D>::download(m.host_val.data(), m.ws.topk_val.data(), m.host_val.bytes());
      r.record(m.dead, m.host_idx.view(), m.host_val.view());
    }
  }
  r.gradients(m);
  if (o.clip_grad > 0) clip_grad_norm(ctx, m.g, o.clip_grad);  // SAELens's, after the sum over processes
  if (o.norm_dec) project_decoder_grads(m.p, m.g, ctx);
  r.update([&] { m.opt.step(m.p, m.g, ctx); });
  if (o.norm_dec) normalize_decoder(m.p, ctx);
  return l;
}

/// One process's step.
template <class Model>
double step(Model& m, InView<typename Model::Scalar, typename Model::device> x,
            InView<typename Model::Scalar, typename Model::device> target) {
  Reducer<Model> one;
  return step(m, x, target, one);
}

}  // namespace mxd::train
