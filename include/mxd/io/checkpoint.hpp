// SPDX-License-Identifier: MIT
/// @file io/checkpoint.hpp
/// @brief Training checkpoints: a model under the reference names (loadable by the authors'
/// PyTorch module), its config in metadata, and the AdamW state, so training resumes bit-exactly.
///
///     mxd::io::save_checkpoint("mxd.safetensors", params, &opt);     // atomic
///     mxd::io::SafetensorsReader f("mxd.safetensors");
///     mxd::Params<float> p = mxd::io::load_params<float>(f, mxd::io::read_config(f));
///     mxd::io::load_optimizer(f, opt);                                  // moments and step
///
/// Keys: the parameters (W_enc, ... as in params_io.hpp; for the transcoder W_enc [I, M],
/// b_enc [M], W_dec [M, O], b_dec_out [O], W_skip.weight [O, I]); `optim.m.NAME` and
/// `optim.v.NAME` in the same layouts; `optim.step` I64 [1]. Metadata: `model` (mxd or
/// topk_transcoder), the config, and the AdamW hyper-parameters.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "../baselines/transcoder.hpp"
#include "../optim.hpp"
#include "params_io.hpp"

namespace mxd::io {

namespace detail {

inline std::string number(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

inline void add_transcoder_metadata(SafetensorsWriter& w, const TranscoderConfig& c) {
  w.set_metadata("model", "topk_transcoder");
  w.set_metadata("d_in", std::to_string(c.d_in));
  w.set_metadata("d_out", std::to_string(c.d_out));
  w.set_metadata("n_latents", std::to_string(c.n_latents));
  w.set_metadata("k", std::to_string(c.k));
  w.set_metadata("skip", c.skip ? "1" : "0");
}

template <class T, class Set>
void add_optimizer(SafetensorsWriter& w, const AdamW<T, cpu, Set>& opt) {
  add_params(w, opt.m, dtype_of<T>(), "optim.m.");
  add_params(w, opt.v, dtype_of<T>(), "optim.v.");
  const std::int64_t step = opt.t;
  w.add("optim.step", {1}, &step);
  const AdamWConfig& c = opt.config();
  w.set_metadata("optim", "adamw");
  w.set_metadata("optim.lr", number(c.lr));
  w.set_metadata("optim.beta1", number(c.beta1));
  w.set_metadata("optim.beta2", number(c.beta2));
  w.set_metadata("optim.eps", number(c.eps));
  w.set_metadata("optim.weight_decay", number(c.weight_decay));
  w.set_metadata("optim.warmup_steps", std::to_string(c.warmup_steps));
}

}  // namespace detail

/// Saves an MxD (and, when given, its optimizer state) to `path`, atomically. Parameters are
/// stored in T's dtype so a resumed run continues with the same bits.
template <class T>
void save_checkpoint(const std::string& path, const Params<T>& p,
                     const AdamW<T, cpu, Params<T>>* opt = nullptr) {
  SafetensorsWriter w;
  w.set_metadata("model", "mxd");
  add_config_metadata(w, p.config);
  add_params(w, p);
  if (opt) detail::add_optimizer(w, *opt);
  w.write(path);
}

/// Saves a TopK / skip transcoder (and its optimizer state) to `path`, atomically.
template <class T>
void save_checkpoint(const std::string& path, const TranscoderParams<T>& p,
                     const AdamW<T, cpu, TranscoderParams<T>>* opt = nullptr) {
  SafetensorsWriter w;
  detail::add_transcoder_metadata(w, p.config);
  add_params(w, p);
  if (opt) detail::add_optimizer(w, *opt);
  w.write(path);
}

/// The transcoder's config from a checkpoint (sizes from shapes, k and skip from metadata).
inline TranscoderConfig read_transcoder_config(SafetensorsReader& f) {
  const auto& meta = f.metadata();
  auto it = meta.find("model");
  MXD_CHECK(it != meta.end() && it->second == "topk_transcoder", f.path(),
            ": not a transcoder checkpoint (metadata 'model' = '",
            it == meta.end() ? std::string("<missing>") : it->second, "')");
  TranscoderConfig c;
  const auto& enc = f.info("W_enc").shape;
  const auto& dec = f.info("W_dec").shape;
  MXD_CHECK(enc.size() == 2 && dec.size() == 2, f.path(), ": W_enc and W_dec must be 2-D");
  c.d_in = enc[0];
  c.n_latents = enc[1];
  c.d_out = dec[1];
  auto k = meta.find("k");
  MXD_CHECK(k != meta.end(), f.path(), ": __metadata__ has no 'k'");
  c.k = parse_index("k", k->second);
  c.skip = f.contains("W_skip.weight");
  c.validate();
  return c;
}

/// Loads a transcoder's parameters.
template <class T>
TranscoderParams<T> load_transcoder(SafetensorsReader& f, const TranscoderConfig& c) {
  TranscoderParams<T> p(c);
  p.for_each([&](const char* name, Tensor<T>& t) {
    read_file_layout<TranscoderParams<T>>(f, name, name, t);
  });
  return p;
}

/// Restores the optimizer's moments and step count saved with the checkpoint; the parameter
/// set of `opt` must have the checkpoint's shapes.
template <class T, class Set>
void load_optimizer(SafetensorsReader& f, AdamW<T, cpu, Set>& opt) {
  MXD_CHECK(f.contains("optim.step"), f.path(), ": checkpoint holds no optimizer state");
  opt.m.for_each([&](const char* name, Tensor<T>& t) {
    read_file_layout<Set>(f, std::string("optim.m.") + name, name, t);
  });
  opt.v.for_each([&](const char* name, Tensor<T>& t) {
    read_file_layout<Set>(f, std::string("optim.v.") + name, name, t);
  });
  const auto step = f.read_all<std::int64_t>("optim.step", {1});
  MXD_CHECK(step[0] >= 0, f.path(), ": optim.step = ", step[0], " is negative");
  opt.t = step[0];
}

}  // namespace mxd::io
