// SPDX-License-Identifier: MIT
/// @file optim.hpp
/// @brief AdamW exactly as torch.optim.AdamW, with the reference's linear warm-up, and the
/// "norm_dec" projection that keeps every expert vector c_n at unit norm.
///
///     mxd::AdamWConfig oc;  oc.lr = 4e-4;  oc.warmup_steps = 5000;
///     mxd::AdamW<float> opt(params, oc);
///     mxd::forward(...); mxd::backward(...);      // grads
///     mxd::project_decoder_grads(params, grads, ws.ctx);   // norm_dec, before the step
///     opt.step(params, grads, ws.ctx);
///     mxd::normalize_decoder(params, ws.ctx);              // norm_dec, after the step
#pragma once

#include <cmath>
#include <type_traits>

#include "backend.hpp"
#include "params.hpp"

namespace mxd {

/// Hyper-parameters; defaults are the paper's (lr 4e-4, no weight decay, 5000 warm-up steps).
struct AdamWConfig {
  double lr = 4e-4;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  long long warmup_steps = 5000;  // linear warm-up to lr, then constant

  /// Throws mxd::Error naming the first invalid field (NaN, negative, beta outside [0, 1)).
  void validate() const {
    MXD_CHECK(std::isfinite(lr) && lr >= 0, "AdamWConfig.lr = ", lr, " must be finite and >= 0");
    MXD_CHECK(std::isfinite(beta1) && beta1 >= 0 && beta1 < 1, "AdamWConfig.beta1 = ", beta1,
              " must be in [0, 1)");
    MXD_CHECK(std::isfinite(beta2) && beta2 >= 0 && beta2 < 1, "AdamWConfig.beta2 = ", beta2,
              " must be in [0, 1)");
    MXD_CHECK(std::isfinite(eps) && eps > 0, "AdamWConfig.eps = ", eps, " must be finite and > 0");
    MXD_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "AdamWConfig.weight_decay = ",
              weight_decay, " must be finite and >= 0");
    MXD_CHECK(warmup_steps >= 0, "AdamWConfig.warmup_steps = ", warmup_steps, " must be >= 0");
  }

  /// Learning rate of step t (1-based): lr * min(1, t / warmup_steps).
  double learning_rate(long long t) const {
    if (warmup_steps <= 0 || t >= warmup_steps) return lr;
    return lr * static_cast<double>(t) / static_cast<double>(warmup_steps);
  }
};


/// AdamW over every tensor of a parameter set (an MxD's Params by default, or any type with
/// `config` and `for_each(name, tensor)` constructible from its config, like the transcoder
/// baselines); the moments m and v have the parameters' shapes.
template <class T, class Device = cpu, class Set = Params<T, Device>>
class AdamW {
public:
  AdamW(const Set& p, AdamWConfig cfg) : m(p.config), v(p.config), cfg_(cfg) { cfg_.validate(); }

  /// One update with this step's learning rate; grads are dL/dparams of the batch. A NaN or
  /// Inf gradient (on either device) is an mxd::Error naming the tensor, thrown before any
  /// weight, moment or the step count changes.
  void step(Set& p, const Set& g, Context<Device>& ctx) {
    g.for_each([&](const char* name, const Tensor<T, Device>& x) {
      const index_t i = backend<Device>::template find_non_finite<T>(ctx, x.view());
      MXD_CHECK(i < 0, "gradient of ", name, ": non-finite value at row ", i / x.cols(),
                " (column ", i % x.cols(), "); no weight was updated");
    });
    ++t;
    const AdamWStep s{cfg_.learning_rate(t),
                      cfg_.beta1,
                      cfg_.beta2,
                      cfg_.eps,
                      cfg_.weight_decay,
                      1.0 - std::pow(cfg_.beta1, static_cast<double>(t)),
                      std::sqrt(1.0 - std::pow(cfg_.beta2, static_cast<double>(t)))};
    Tensor<T, Device>* params[16];
    const Tensor<T, Device>* grads[16];
    Tensor<T, Device>* ms[16];
    Tensor<T, Device>* vs[16];
    int n = 0;
    p.for_each([&](const char*, Tensor<T, Device>& x) { params[n++] = &x; });
    n = 0;
    g.for_each([&](const char*, const Tensor<T, Device>& x) { grads[n++] = &x; });
    n = 0;
    m.for_each([&](const char*, Tensor<T, Device>& x) { ms[n++] = &x; });
    n = 0;
    v.for_each([&](const char*, Tensor<T, Device>& x) { vs[n++] = &x; });
    for (int i = 0; i < n; ++i) {
      MXD_CHECK(params[i]->size() == grads[i]->size() && params[i]->size() == ms[i]->size(),
                "AdamW::step: parameter ", i, " has ", params[i]->size(), " values, its gradient ",
                grads[i]->size(), " and its moments ", ms[i]->size());
      backend<Device>::adamw_update(ctx, params[i]->view(), grads[i]->view(), ms[i]->view(),
                                    vs[i]->view(), s);
    }
  }

  const AdamWConfig& config() const { return cfg_; }

  long long t = 0;  // steps taken
  Set m;            // first moments
  Set v;            // second moments

private:
  AdamWConfig cfg_;
};

/// norm_dec, before the step: removes from each dC[n] its component along c_n. The MxD's
/// "decoder" rows here are its expert vectors c_n (rows of C); transcoders overload this and
/// normalize_decoder for their W_dec rows (baselines/transcoder.hpp).
template <class T, class Device>
void project_decoder_grads(const Params<T, Device>& p, Grads<T, Device>& g, Context<Device>& ctx) {
  backend<Device>::remove_parallel_rows(ctx, p.C.view(), g.C.view());
}

/// norm_dec, after the step: rescales every expert vector c_n to unit norm.
template <class T, class Device>
void normalize_decoder(Params<T, Device>& p, Context<Device>& ctx) {
  backend<Device>::normalize_rows(ctx, p.C.view());
}

}  // namespace mxd
