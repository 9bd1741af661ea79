// SPDX-License-Identifier: MIT
// mxd train: what --resume reads: the checkpoint pair, the dead-unit state beside it, and the layer flags it must agree with.
#pragma once

#include <filesystem>
#include <string>
#include <utility>

#include <mxd/io/checkpoint.hpp>

#include "options.hpp"

namespace mxd::cli::training {

// The dead-unit state saved beside a checkpoint with --aux-k: DIR/NAME.safetensors ->
// DIR/NAME.dead.safetensors (in the same checkpoint set, so it is committed with the model).
inline std::string dead_file(const std::string& checkpoint) {
  const std::filesystem::path p(checkpoint);
  return (p.parent_path() / (p.stem().string() + ".dead.safetensors")).string();
}

// The MxD and baseline files to resume from (baseline "" when there is none). From a
// directory, or a file in one, that holds a checkpoint manifest: the pair it names, which is
// always complete and at one step. A lone file (no manifest): it and the baseline beside it.
// Without the MxD (--models), the MxD file is "" and only the baseline's is looked for.
inline std::pair<std::string, std::string> resume_files(const std::string& resume,
                                                 const std::string& tc_file, bool with_mxd = true) {
  namespace fs = std::filesystem;
  const bool is_dir = fs::is_directory(resume);
  const std::string dir = is_dir ? resume : io::parent_dir(resume);
  const io::CheckpointDir::Set set = io::CheckpointDir(dir).latest();
  if (set.step >= 0) {
    const std::string m = with_mxd ? set.file("mxd.safetensors") : std::string();
    MXD_CHECK(!with_mxd || !m.empty(), io::CheckpointDir(dir).manifest(),
              " names no mxd.safetensors (use the --models it was trained with)");
    return {m, set.file(tc_file)};
  }
  MXD_CHECK(!is_dir, "--resume ", resume, ": the directory has no checkpoint.json");
  const std::string b = (fs::path(dir) / tc_file).string();
  if (!with_mxd) return {"", fs::exists(b) ? b : ""};
  return {resume, fs::exists(b) ? b : ""};
}

// --resume refuses a layer flag whose value differs from the checkpoint's: the run continues
// the saved model, so the flag would be ignored while the report showed it.
// Without the MxD (mc null), only the baseline's flags are checked.
inline void check_resume_flags(const Options& o, index_t k, const Config* mc, const TranscoderConfig* t) {
  auto same = [&](const char* flag, const std::string& given, const std::string& saved) {
    MXD_CHECK(!o.layer_given.count(flag) || given == saved, "--", flag, " ", given,
              " conflicts with the checkpoint resumed (", o.resume, "), whose ", flag, " is ",
              saved, ": --resume continues the saved model, so drop --", flag);
  };
  const auto str = [](index_t v) { return std::to_string(static_cast<long long>(v)); };
  if (t && o.latents > 0) same("latents", str(o.latents), str(t->n_latents));
  if (t && !mc) same("k", str(k), str(t->k));
  if (t) same("tc-rank-by-dec-norm", o.tc.rank_by_decoder_norm ? "on" : "off",
              t->rank_by_decoder_norm ? "on" : "off");
  if (!mc) return;
  const Config& c = *mc;
  same("d-in", str(o.layer.d_in), str(c.d_in));
  same("d-hidden", str(o.layer.d_hidden), str(c.d_hidden));
  same("d-out", str(o.layer.d_out), str(c.d_out));
  same("experts", str(o.layer.n_experts), str(c.n_experts));
  same("k", str(k), str(c.k));
  same("activation", activation_name(o.layer.activation), activation_name(c.activation));
  same("glu", o.layer.glu ? "on" : "off", c.glu ? "on" : "off");
  same("skip", o.layer.skip ? "on" : "off", c.skip ? "on" : "off");
  if (t && o.latents == 0)
    same("expansion", str(o.expansion),
         t->n_latents % t->d_in == 0 ? str(t->n_latents / t->d_in)
                                     : str(t->n_latents) + " / " + str(t->d_in));
}

}  // namespace mxd::cli::training
