// SPDX-License-Identifier: MIT
// mxd train: what a finished run prints and writes.
#pragma once

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <mxd/io/durable.hpp>

#include "../svg.hpp"
#include "evaluate.hpp"
#include "options.hpp"

namespace mxd::cli::training {

// Rank 0's report after training: the table on stdout, metrics.json, loss.svg and, for a k
// sweep, frontier.svg.
inline void report(const Options& o, const std::vector<Row>& rows, const std::vector<Series>& curves) {
  const Dist* d = o.dist;
  const bool par = d && d->comm;
  const bool sweep = o.ks.size() > 1;
  nlohmann::json ranks = nlohmann::json::array();
  if (par) {
    std::printf("%d processes, --parallel %s; per rank: bytes sent per step, memory of the model "
                "(parameters, gradients, AdamW moments, workspace), the process's peak RSS\n",
                d->size(), d->mode == Parallel::data ? "data" : "experts");
    for (const Row& r : rows)
      for (int q = 0; q < d->size(); ++q) {
        std::printf("  rank %d %-18s %12.0f B/step %10.1f MiB %10.1f MiB peak\n", q, r.name.c_str(),
                    r.rank_bytes_per_step[q], r.rank_memory[q] / 1048576.0,
                    r.rank_peak_rss[q] / 1048576.0);
        ranks.push_back({{"rank", q}, {"model", r.name}, {"k", r.k},
                         {"bytes_sent_per_step", r.rank_bytes_per_step[q]},
                         {"memory_bytes", r.rank_memory[q]}, {"peak_rss_bytes", r.rank_peak_rss[q]}});
      }
  }

  std::printf("%-18s %12s %5s %12s %12s %8s %12s\n", "model", "params", "k", "nmse_ref", "fvu",
              "dead", "tokens/s");
  nlohmann::json models = nlohmann::json::array();
  for (const Row& r : rows) {
    std::printf("%-18s %12lld %5lld %12.5g %12.5g %8.4f %12.0f\n", r.name.c_str(),
                (long long)r.params, (long long)r.k, r.eval.nmse, r.eval.fvu, r.eval.dead_fraction,
                r.tokens_per_s);
    models.push_back({{"name", r.name}, {"params", r.params}, {"k", r.k}, {"nmse", r.eval.nmse},
                      {"fvu", r.eval.fvu}, {"dead_fraction", r.eval.dead_fraction},
                      {"tokens_per_s", r.tokens_per_s}});
    if (r.aux.enabled())  // each model's own: the baseline's recipe may differ (--tc-aux-k)
      models.back().update({{"aux_k", r.aux.k}, {"aux_coef", r.aux.coef},
                            {"aux_form", r.aux.form == train::AuxKForm::saelens ? "saelens"
                                                                                 : "normalized"},
                            {"dead_window", r.aux.dead_window},
                            {"train_dead_fraction", r.train_dead}});
  }
  if (o.aux.enabled())
    std::printf("AuxK loss on: k_aux %lld, coef %g, dead window %lld tokens\n", (long long)o.aux.k,
                o.aux.coef, (long long)o.aux.dead_window);
  if (o.baseline != "none") {  // the baseline's recipe as it ran (--tc-*; SAELens's by default)
    const Recipes r = recipes(o);
    char clip[32] = "off", aux[64] = "off";
    if (r.tc_step.clip_grad > 0) std::snprintf(clip, sizeof clip, "%g", r.tc_step.clip_grad);
    if (r.tc_step.aux.enabled())
      std::snprintf(aux, sizeof aux, "k_aux %lld (%s form)", (long long)r.tc_step.aux.k,
                    r.tc_step.aux.form == train::AuxKForm::saelens ? "SAELens's" : "normalized");
    std::printf("baseline recipe: %s loss, %s init, clip %s, warm-up %lld, AuxK %s, %s decoder rows%s\n",
                loss_name(r.tc_step.loss), o.tc.tied_init ? "tied" : "uniform", clip,
                (long long)r.tc_adamw.warmup_steps, aux, r.tc_step.norm_dec ? "unit-norm" : "free",
                o.tc.rank_by_decoder_norm ? ", ranked by their norms" : "");
  }
  namespace fs = std::filesystem;
  const fs::path out(o.out);
  nlohmann::json metrics{{"models", models}};
  if (par)
    metrics["parallel"] = {{"mode", d->mode == Parallel::data ? "data" : "experts"},
                           {"processes", d->size()}, {"ranks", ranks}};
  io::write_file_durable((out / "metrics.json").string(), metrics.dump(2) + "\n");
  Axes loss_axes;
  // Each model's own training loss: the baseline's may be another (--tc-loss).
  const Loss tc_loss = recipes(o).tc_step.loss;
  loss_axes.title = o.baseline == "none" || tc_loss == Loss::nmse_ref
                        ? std::string("training loss (reference normalized MSE)")
                        : std::string("training loss (MxD: reference normalized MSE; baseline: ") +
                              loss_name(tc_loss) + ")";
  if (sweep) loss_axes.title += "; dashed: the baseline at the same k";
  loss_axes.x_label = "step";
  loss_axes.y_label = "loss";
  loss_axes.log_y = true;
  write_svg_plot((out / "loss.svg").string(), loss_axes, curves);
  if (sweep) {
    std::vector<Series> frontier;
    for (const Row& r : rows) {
      auto it = std::find_if(frontier.begin(), frontier.end(),
                             [&](const Series& s) { return s.name == r.name; });
      if (it == frontier.end()) {
        it = frontier.insert(frontier.end(), Series());
        it->name = r.name;
        it->dashed = frontier.size() > 1;
        it->markers = true;
      }
      it->x.push_back(double(r.k));
      it->y.push_back(r.eval.fvu);
    }
    Axes axes;
    axes.title = "sparsity-accuracy frontier (held-out)";
    axes.x_label = "k";
    axes.y_label = "FVU";
    axes.log_x = axes.log_y = true;
    for (index_t k : o.ks) axes.x_ticks.push_back(double(k));
    write_svg_plot((out / "frontier.svg").string(), axes, frontier);
  }
  std::printf("wrote %s/{metrics.json, log.csv, loss.svg%s, checkpoints}\n", o.out.c_str(),
              sweep ? ", frontier.svg" : "");
}

}  // namespace mxd::cli::training
