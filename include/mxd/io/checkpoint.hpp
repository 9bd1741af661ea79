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

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

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
  if (c.rank_by_decoder_norm) w.set_metadata("rank_by_decoder_norm", "1");  // absent: plain top-k
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

// The NaN/Inf policy: a checkpoint never holds a non-finite value, so the last one written
// is always good to resume from.
template <class Set>
void check_set_finite(const Set& p, const std::string& prefix) {
  p.for_each([&](const char* name, const auto& t) {
    check_finite(t.view(), "checkpoint: " + prefix + name);
  });
}

template <class T, class Set>
void check_finite_state(const Set& p, const AdamW<T, cpu, Set>* opt) {
  check_set_finite(p, "");
  if (opt) {
    check_set_finite(opt->m, "optim.m.");
    check_set_finite(opt->v, "optim.v.");
  }
}

}  // namespace detail

/// Saves an MxD (and, when given, its optimizer state) to `path`, atomically and durably
/// (fsync). Parameters are stored in T's dtype so a resumed run continues with the same bits.
/// A non-finite value anywhere is an error and nothing is written.
template <class T>
void save_checkpoint(const std::string& path, const Params<T>& p,
                     const AdamW<T, cpu, Params<T>>* opt = nullptr) {
  detail::check_finite_state(p, opt);
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
  detail::check_finite_state(p, opt);
  SafetensorsWriter w;
  detail::add_transcoder_metadata(w, p.config);
  add_params(w, p);
  if (opt) detail::add_optimizer(w, *opt);
  w.write(path);
}

/// The transcoder's config from a checkpoint (sizes from shapes, k and rank_by_decoder_norm
/// from metadata, skip from whether W_skip.weight exists).
inline TranscoderConfig read_transcoder_config(SafetensorsReader& f) {
  const auto& meta = f.metadata();
  auto it = meta.find("model");
  MXD_CHECK(it != meta.end() && it->second == "topk_transcoder", f.path(),
            ": not a transcoder checkpoint (metadata 'model' = '",
            it == meta.end() ? std::string("<missing>") : mxd::detail::printable(it->second), "')");
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
  auto rank = meta.find("rank_by_decoder_norm");
  MXD_CHECK(rank == meta.end() || rank->second == "0" || rank->second == "1", f.path(),
            ": metadata 'rank_by_decoder_norm' = '", mxd::detail::printable(rank->second),
            "' is not 0 or 1");
  c.rank_by_decoder_norm = rank != meta.end() && rank->second == "1";
  c.validate();
  expect_param_shapes<TranscoderParams<float>>(f, c);  // before anything is allocated
  return c;
}

/// Loads a transcoder's parameters.
template <class T>
TranscoderParams<T> load_transcoder(SafetensorsReader& f, const TranscoderConfig& c) {
  return load_param_set<TranscoderParams<T>>(f, c);
}

/// Restores the optimizer's moments and step count saved with the checkpoint; the parameter
/// set of `opt` must have the checkpoint's shapes.
template <class T, class Set>
void load_optimizer(SafetensorsReader& f, AdamW<T, cpu, Set>& opt) {
  MXD_CHECK(f.contains("optim.step"), f.path(), ": checkpoint holds no optimizer state");
  opt.m.for_each_param([&](const ParamDesc& d, Tensor<T>& t) {
    read_file_layout(f, std::string("optim.m.") + d.name, d, t);
  });
  opt.v.for_each_param([&](const ParamDesc& d, Tensor<T>& t) {
    read_file_layout(f, std::string("optim.v.") + d.name, d, t);
    for (index_t i = 0; i < t.size(); ++i)  // second moments are squares: negative ones give NaN
      MXD_CHECK(t[i] >= T(0), f.path(), ": optim.v.", d.name, " holds the negative value ",
                double(t[i]), " at element ", i);
  });
  const auto step = f.read_all<std::int64_t>("optim.step", {1});
  MXD_CHECK(step[0] >= 0, f.path(), ": optim.step = ", step[0], " is negative");
  opt.t = step[0];
}

/// A directory of checkpoint sets, each committed atomically: a run killed at any moment
/// leaves the previous complete set (say an MxD and its baseline at the same step) to resume
/// from, never a mix of two steps.
///
///     mxd::io::CheckpointDir dir("mxd_out");
///     dir.commit(step, [&](const std::string& folder) {        // write the set into folder
///       mxd::io::save_checkpoint(folder + "/mxd.safetensors", p, &opt);
///       mxd::io::save_checkpoint(folder + "/topk_transcoder.safetensors", tp, &topt);
///     });
///     auto last = dir.latest();     // step and file paths of the last committed set, if any
///
/// Layout: each commit first records the set it will write and the committed one in
/// DIR/checkpoint<tag>.journal, writes DIR/set_G<tag>.tmp/ (G above the committed set's,
/// skipping names already taken), syncs every file and renames it to DIR/set_G<tag>/;
/// DIR/checkpoint<tag>.json, naming that directory and the step, is then replaced atomically
/// (the commit point); then every file is hard-linked (copied where links are impossible) to
/// DIR/<file name with the tag before its extension> for readers that want one stable path,
/// and the previous set is removed. The only directories ever removed are those the manifest
/// or the journal names (a user's own set_7/ is left alone); a failed commit removes what it
/// wrote, and one killed mid-way is cleaned up by the next commit through the journal.
/// Failures are IoErrors naming the file and the errno.
class CheckpointDir {
public:
  struct Set {
    long long step = -1;
    std::string name;                // its directory in DIR, e.g. "set_3"
    std::vector<std::string> files;  // paths, in the order written
    /// The path of the file named `name` (e.g. "mxd.safetensors") in the set, or "".
    std::string file(const std::string& name) const {
      for (const auto& f : files)
        if (std::filesystem::path(f).filename() == name) return f;
      return "";
    }
  };

  explicit CheckpointDir(std::string dir, std::string tag = "")
      : dir_(std::move(dir)), tag_(std::move(tag)) {}

  /// The manifest's path: DIR/checkpoint<tag>.json.
  std::string manifest() const { return (std::filesystem::path(dir_) / ("checkpoint" + tag_ + ".json")).string(); }
  /// The journal's path: DIR/checkpoint<tag>.journal (sets written but maybe not yet removed).
  std::string journal() const { return (std::filesystem::path(dir_) / ("checkpoint" + tag_ + ".journal")).string(); }

  /// Writes the set of `step` through write(folder) and commits it (see the class comment).
  template <class Write>
  void commit(long long step, Write&& write) {
    namespace fs = std::filesystem;
    const std::string previous = committed_name();
    remove_journaled(previous);
    const std::string name = free_name(previous);
    const fs::path dir(dir_), tmp = dir / (name + ".tmp"), final_dir = dir / name;
    // No half-written set stays behind (one the manifest names is committed, and kept).
    auto discard = [&] {
      std::error_code ignored;
      if (committed_name() == name) return;
      fs::remove_all(tmp, ignored);
      fs::remove_all(final_dir, ignored);
    };
    try {
      std::error_code ec;
      fs::create_directories(dir, ec);
      if (ec) throw IoError::failed("cannot create '" + dir_ + "'", ec.value());
      write_file_durable(journal(), name + "\n" + previous + "\n");
      fs::create_directory(tmp, ec);
      if (ec) throw IoError::failed("cannot create '" + tmp.string() + "'", ec.value());
      write(tmp.string());
      std::vector<std::string> files;
      for (const auto& e : fs::directory_iterator(tmp, ec)) files.push_back(e.path().filename().string());
      if (ec) throw IoError::failed("cannot list '" + tmp.string() + "'", ec.value());
      std::sort(files.begin(), files.end());
      for (const auto& f : files) sync_file((tmp / f).string());
      sync_dir(tmp.string());
      fs::rename(tmp, final_dir, ec);
      if (ec) throw IoError::failed("cannot rename '" + tmp.string() + "' to '" + final_dir.string() + "'", ec.value());
      sync_dir(dir_);
      nlohmann::json m = {{"step", step}, {"dir", name}, {"files", files}};
      write_file_durable(manifest(), m.dump(2) + "\n");  // the commit point
      for (const auto& f : files) link_over(final_dir / f, dir / stable_name(f));
      sync_dir(dir_);
    } catch (const IoError& e) {
      discard();
      if (e.code != ENOSPC) throw;
      throw IoError(std::string(e.what()) + " (a checkpoint needs room for two sets: the last "
                    "committed one is kept until the new one is complete)", e.code);
    } catch (...) {
      discard();
      throw;
    }
    remove_journaled(name);
    std::error_code ec;
    fs::remove(journal(), ec);
  }

  /// The last committed set; step -1 and no files when there is none. A manifest that does
  /// not name a complete set in this directory is an error.
  Set latest() const {
    Set out;
    if (!regular_file_exists(manifest())) return out;
    std::ifstream in(manifest(), std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), {});
    MXD_CHECK(!in.bad(), "cannot read ", manifest());
    nlohmann::json m;
    try {
      m = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception&) {
      throw Error(manifest() + ": not a valid checkpoint manifest (JSON)");
    }
    MXD_CHECK(m.is_object() && m.contains("step") && m["step"].is_number_integer() &&
                  m.contains("dir") && m["dir"].is_string() && m.contains("files") &&
                  m["files"].is_array(),
              manifest(), ": a checkpoint manifest needs step, dir and files");
    const std::string name = m["dir"].get<std::string>();
    MXD_CHECK(is_plain_name(name), manifest(), ": dir '", mxd::detail::printable(name),
              "' is not a directory name");
    out.step = m["step"].get<long long>();
    out.name = name;
    MXD_CHECK(out.step >= 0, manifest(), ": step ", out.step, " is negative");
    for (const auto& f : m["files"]) {
      MXD_CHECK(f.is_string() && is_plain_name(f.get<std::string>()), manifest(),
                ": files must be plain file names");
      const std::filesystem::path p = std::filesystem::path(dir_) / name / f.get<std::string>();
      MXD_CHECK(regular_file_exists(p.string()), manifest(), " names ", p.string(), ", which does not exist");
      out.files.push_back(p.string());
    }
    return out;
  }

private:
  using json = nlohmann::json;

  static bool is_plain_name(const std::string& s) {
    return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
           s.find('\\') == std::string::npos && s.find('\0') == std::string::npos;
  }

  // "mxd.safetensors" -> "mxd<tag>.safetensors".
  std::string stable_name(const std::string& file) const {
    const std::filesystem::path p(file);
    return p.stem().string() + tag_ + p.extension().string();
  }

  // Replaces dst by a hard link to src (a copy where the file system has no links), atomically.
  static void link_over(const std::filesystem::path& src, const std::filesystem::path& dst) {
    namespace fs = std::filesystem;
    const fs::path tmp = dst.string() + ".tmp";
    std::error_code ec;
    fs::remove(tmp, ec);
    fs::create_hard_link(src, tmp, ec);
    if (ec) fs::copy_file(src, tmp, fs::copy_options::overwrite_existing, ec);
    if (ec) throw IoError::failed("cannot link or copy '" + src.string() + "' to '" + tmp.string() + "'", ec.value());
    fs::rename(tmp, dst, ec);
    if (ec) {
      std::error_code ignored;
      fs::remove(tmp, ignored);
      throw IoError::failed("cannot rename '" + tmp.string() + "' to '" + dst.string() + "'", ec.value());
    }
  }

  // The generation G of a set directory named "set_G<tag>", else -1.
  long long generation(const std::string& n) const {
    if (n.rfind("set_", 0) != 0 || n.size() < 4 + tag_.size() ||
        n.compare(n.size() - tag_.size(), tag_.size(), tag_) != 0)
      return -1;
    const std::string digits = n.substr(4, n.size() - 4 - tag_.size());
    if (digits.empty() || digits.size() > 15 || digits.find_first_not_of("0123456789") != std::string::npos)
      return -1;
    return std::stoll(digits);
  }

  // The directory of the set the manifest names ("" when there is no usable manifest: a
  // fresh run may overwrite a directory whose manifest is broken).
  std::string committed_name() const {
    try {
      return latest().name;
    } catch (const Error&) {
      return "";
    }
  }

  // The first set_G<tag> above `previous`'s generation with neither it nor its .tmp taken.
  std::string free_name(const std::string& previous) const {
    namespace fs = std::filesystem;
    std::error_code ec;
    for (long long g = generation(previous) + 1;; ++g) {
      const std::string n = "set_" + std::to_string(g) + tag_;
      if (!fs::exists(fs::path(dir_) / n, ec) && !fs::exists(fs::path(dir_) / (n + ".tmp"), ec)) return n;
    }
  }

  // Removes every set the journal names (and its .tmp) but `keep`: sets an earlier commit
  // wrote and did not finish, or replaced and did not remove before it was killed.
  void remove_journaled(const std::string& keep) const {
    namespace fs = std::filesystem;
    if (!regular_file_exists(journal())) return;
    std::ifstream in(journal());
    std::error_code ec;
    for (std::string n; std::getline(in, n);) {
      if (n == keep || !is_plain_name(n) || generation(n) < 0) continue;
      fs::remove_all(fs::path(dir_) / n, ec);
      if (ec) throw IoError::failed("cannot remove the old checkpoint set '" + (fs::path(dir_) / n).string() + "'", ec.value());
      fs::remove_all(fs::path(dir_) / (n + ".tmp"), ec);
      if (ec) throw IoError::failed("cannot remove '" + (fs::path(dir_) / (n + ".tmp")).string() + "'", ec.value());
    }
  }

  std::string dir_, tag_;
};

}  // namespace mxd::io
