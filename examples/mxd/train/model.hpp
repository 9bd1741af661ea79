// SPDX-License-Identifier: MIT
// mxd train: one model in training (the MxD or a baseline) on the host, on the GPU or over the
// ranks of --parallel. Every step is train::step; this file only chooses where it runs.
#pragma once

#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <mxd/io/checkpoint.hpp>
#include <mxd/parallel/step.hpp>
#include <mxd/train/dead_units_io.hpp>
#include <mxd/train/step.hpp>

#include "../cuda.hpp"
#include "../memory.hpp"
#include "../parallel.hpp"
#include "checkpoints.hpp"
#include "options.hpp"

namespace mxd::cli::training {

// Set = Params (the MxD) or TranscoderParams (the TopK or skip baseline). Its state lives in a
// host train::Trainer; with --device cuda a DeviceModel trains a copy on the GPU and the host
// one is refreshed from it when the model is saved.
template <class T, template <class, class> class Set>
class Model {
public:
  using Host = train::Trainer<Set<T, cpu>>;
  static constexpr bool is_mxd = std::is_same_v<Set<T, cpu>, Params<T, cpu>>;

  Model(Set<T, cpu> p, const AdamWConfig& oc, const train::StepOptions& so, int threads)
      : t(std::move(p), oc, so) {
    t.ws.ctx.threads = threads;
    if constexpr (is_mxd) name = "mxd";
    else name = t.p.config.skip ? "skip_transcoder" : "topk_transcoder";
  }

  std::string name;
  Host t;
  std::vector<index_t> rows;  // --parallel: every rank's rows of the current batch
  double bytes_sent = 0;      // --parallel: bytes this rank sent during the model's steps
  double trained_memory = 0;  // memory_bytes() after the last step (workspaces shrink in evaluation)

  // Moves training to the GPU from the current state.
  void to_gpu(const std::string& math) {
    gpu_ = make_cuda_model<T, Set>(t.p, t.opt, t.dead, t.options, math);
  }
  bool on_gpu() const { return gpu_ != nullptr; }

  // --parallel: this rank's part. The MxD under --parallel experts keeps its shard of the
  // experts (weights and moments); every other model is data-parallel.
  void distribute(parallel::Communicator& comm, Parallel mode) {
    comm_ = &comm;
    if constexpr (is_mxd) {
      if (mode == Parallel::experts) {
        shard_experts();
        reducer_ = std::make_unique<parallel::ExpertParallelStep<T>>(comm, rows, *ep_);
        return;
      }
    }
    reducer_ = std::make_unique<parallel::DataParallel<Host>>(comm, rows);
  }
  // True when predict() is collective (every rank calls it, even with no rows).
  bool collective_forward() const { return ep_ != nullptr; }

  // One step on (x, target); returns its training loss before the update (train::step).
  // Under --parallel, x and target are this rank's rows and the loss is the whole batch's.
  double train_step(const Tensor<T>& x, const Tensor<T>& target) {
    if (gpu_) return gpu_->train_step(x, target);
    if (!reducer_) return train::step(t, x.view(), target.view());
    const std::uint64_t sent = comm_->bytes_sent;
    reducer_->rows = rows;
    const double l = train::step(t, x.view(), target.view(), *reducer_);
    bytes_sent += double(comm_->bytes_sent - sent);
    return l;
  }
  // y = model(x) with its selection in idx() and val(). x: [B, I], y: [B, O].
  void predict(const Tensor<T>& x, Tensor<T>& y) {
    if (gpu_) return gpu_->predict(x, y, gpu_idx_, gpu_val_);
    if constexpr (is_mxd) {
      if (ep_) return ep_->forward(t.p, x.view(), y.view(), t.ws, rows);
    }
    mxd::forward(t.p, x.view(), y.view(), t.ws);
  }
  const Tensor<std::int32_t>& idx() const { return gpu_ ? gpu_idx_ : t.ws.topk_idx; }
  const Tensor<T>& val() const { return gpu_ ? gpu_val_ : t.ws.topk_val; }

  // The whole layer's figures (a rank holds a shard of the experts under --parallel experts).
  const auto& layer() const {
    if constexpr (is_mxd) return ep_ ? ep_->full_config() : t.p.config;
    else return t.p.config;
  }
  index_t k() const { return layer().k; }
  index_t units() const {
    if constexpr (is_mxd) return layer().n_experts;
    else return layer().n_latents;
  }
  index_t n_params() const { return layer().n_params(); }
  double train_dead_fraction() {
    if (gpu_) gpu_->download(t.p, t.opt, t.dead);
    return double(t.dead.count()) / double(units());
  }

  // Collective under --parallel experts, before save(): rank 0 gathers the whole set.
  void gather_for_save() {
    if constexpr (is_mxd) {
      if (!ep_) return;
      const bool root = comm_->rank() == 0;
      if (root && full_.config.n_experts == 0) {
        full_ = Params<T>(ep_->full_config());
        full_opt_ = std::make_unique<AdamW<T>>(full_, t.opt.config());
      }
      Params<T> none;
      parallel::gather_experts(*comm_, t.p, root ? full_ : none, ep_->shards());
      parallel::gather_experts(*comm_, t.opt.m, root ? full_opt_->m : none, ep_->shards());
      parallel::gather_experts(*comm_, t.opt.v, root ? full_opt_->v : none, ep_->shards());
      if (root) full_opt_->t = t.opt.t;
    }
  }
  void save(const std::string& path) {
    if (gpu_) gpu_->download(t.p, t.opt, t.dead);
    if constexpr (is_mxd) {
      if (ep_) {
        io::save_checkpoint(path, full_, full_opt_.get());
        return;
      }
    }
    io::save_checkpoint(path, t.p, &t.opt);
    if (t.options.aux.enabled()) train::save_dead_units(dead_file(path), t.dead);
  }
  // With --aux-k, on a resumed model: the dead-unit state from beside `path`, when it was saved.
  void resume_aux(const std::string& path) {
    if (!t.options.aux.enabled()) return;
    if (std::filesystem::exists(dead_file(path))) train::load_dead_units(dead_file(path), t.dead);
    else
      std::fprintf(stderr, "mxd: note: %s has no dead-unit state beside it; the dead window "
                           "restarts\n", path.c_str());
  }

  // Bytes of parameters, gradients, AdamW moments and workspace on this rank.
  double memory_bytes() const {
    double b = 0;
    for (const Set<T, cpu>* s : {&t.p, &t.g, &t.opt.m, &t.opt.v})
      s->for_each([&](const char*, const Tensor<T>& x) { b += double(x.bytes()); });
    if constexpr (is_mxd) {
      b += double(t.ws.bytes()) + (ep_ ? double(ep_->bytes()) : 0.0);
    } else {
      const auto& w = t.ws;
      for (const auto* x : {&w.scores, &w.topk_val, &w.v, &w.ds, &w.dec_norm, &w.enc_scaled, &w.bias_scaled})
        b += double(x->bytes());
      for (const auto* x : {&w.topk_idx, &w.order, &w.offsets}) b += double(x->bytes());
    }
    return b;
  }

private:
  void shard_experts() {
    ep_ = std::make_unique<parallel::ExpertParallel<T>>(*comm_, t.p.config);
    const index_t first = ep_->first_expert(), n = ep_->shards()[comm_->rank()];
    Params<T> local = parallel::shard_params(t.p, first, n);
    AdamW<T> lopt(local, t.opt.config());
    lopt.m = parallel::shard_params(t.opt.m, first, n);
    lopt.v = parallel::shard_params(t.opt.v, first, n);
    lopt.t = t.opt.t;
    t.p = std::move(local);
    t.opt = std::move(lopt);
    t.g = Grads<T>(t.p.config);
  }

  std::unique_ptr<DeviceModel<T, Set>> gpu_;
  Tensor<std::int32_t> gpu_idx_;  // the GPU's last selection, copied back
  Tensor<T> gpu_val_;
  parallel::Communicator* comm_ = nullptr;
  std::unique_ptr<parallel::DataParallel<Host>> reducer_;
  std::unique_ptr<parallel::ExpertParallel<T>> ep_;  // --parallel experts (the MxD)
  Params<T> full_;                                   // rank 0: the gathered set, to save
  std::unique_ptr<AdamW<T>> full_opt_;
};

template <class T>
using MxdModel = Model<T, Params>;
template <class T>
using TranscoderModel = Model<T, TranscoderParams>;

// Refuses sizes that this machine cannot hold, before anything is allocated (memory.hpp).
// Counted per rank: both models' parameters, gradients and AdamW moments, their workspaces
// for the rank's rows of a batch, the batch and the teacher's held-out rows; under
// --parallel experts only the rank's share of the experts, but rank 0 also gathers the whole
// set to save it. The ranks that share the machine are counted together.
template <class T>
void check_train_memory(const Options& o) {
  Config c = o.layer;
  c.k = *std::max_element(o.ks.begin(), o.ks.end());
  TranscoderConfig tcc{c.d_in, c.d_out, o.latents > 0 ? o.latents : o.expansion * c.d_in, c.k,
                       o.baseline == "skip"};
  if (!o.resume.empty()) {  // the checkpoint's sizes, whatever the flags say
    const auto files = resume_files(o.resume, std::string(tcc.skip ? "skip" : "topk") +
                                                  "_transcoder.safetensors", o.train_mxd);
    if (!files.first.empty()) {
      io::SafetensorsReader f(files.first);
      c = io::read_config(f);
    }
    if (!files.second.empty()) {
      io::SafetensorsReader b(files.second);
      tcc = io::read_transcoder_config(b);
    }
  }
  const Dist* d = o.dist;
  const int P = d && d->comm ? d->size() : 1;
  const bool experts = P > 1 && d->mode == Parallel::experts;
  const double s = sizeof(T), rows = std::ceil(double(o.batch) / P);
  const double expert_params = double(c.n_experts) * double(c.d_in + 1 + c.d_out);
  const double dense = double(c.n_params()) - expert_params;
  double rank = 2 * s * double(o.batch) * double(c.d_in + c.d_out);
  if (o.train_mxd)  // --models without mxd: the baseline alone
    rank += 4 * s * (dense + (experts ? std::ceil(expert_params / P) : expert_params)) +
            workspace_bytes<T>(c, rows);
  if (o.baseline != "none")  // (with the ranking by decoder norm, a scaled copy of W_enc too)
    rank += 4 * s * double(tcc.n_params()) + s * rows * double(tcc.n_latents + 2 * c.d_out) +
            (o.tc.rank_by_decoder_norm ? s * double(tcc.n_latents) * double(tcc.d_in + 2) : 0.0);
  if (o.data.empty()) rank += s * double(o.eval_rows) * double(c.d_in + c.d_out);
  const double gather = o.train_mxd && experts && d->root() ? 3 * s * double(c.n_params()) : 0;
  const int here = P > 1 ? ranks_on_this_machine() : 1;
  check_memory(here * rank + gather,
               "parameters, gradients, AdamW moments and workspaces of both models, and the data" +
                   (here > 1 ? ", for the " + std::to_string(here) + " ranks on this machine" : std::string()));
}

}  // namespace mxd::cli::training
