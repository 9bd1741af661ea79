// SPDX-License-Identifier: MIT
// mxd train: trains an MxD and a parameter-matched TopK (or skip) transcoder on the same
// stream of (x, y) pairs, then evaluates both on held-out pairs. The flags are in
// train/options.hpp, each model's step in train/model.hpp (train::step), the --out folder in
// train/out_dir.hpp, the held-out figures in train/evaluate.hpp and the report in
// train/report.hpp; this file is the training loop.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/init.hpp>
#include <mxd/io/checkpoint.hpp>
#include <mxd/mxd.hpp>
#include <mxd/train/baseline.hpp>
#include <mxd/train/data.hpp>

#include "cli.hpp"
#include "commands.hpp"
#include "parallel.hpp"
#include "progress.hpp"
#include "svg.hpp"
#include "train/checkpoints.hpp"
#include "train/evaluate.hpp"
#include "train/model.hpp"
#include "train/options.hpp"
#include "train/out_dir.hpp"
#include "train/report.hpp"

namespace mxd::cli {
namespace training {

// Trains both models at one k; returns their rows and appends their loss curves.
template <class T>
std::vector<Row> train_at(const Options& o, index_t k, train::DataSource<T>& src, bool sweep,
                          std::vector<Series>& curves, std::vector<std::vector<double>>& log_cols,
                          std::vector<std::string>& log_names) {
  const Recipes r = recipes(o);
  Config cfg = o.layer;
  cfg.k = k;
  index_t start = 0;
  std::unique_ptr<MxdModel<T>> mxd;
  std::unique_ptr<TranscoderModel<T>> tc;
  const std::string suffix = sweep ? "_k" + std::to_string(k) : "";
  const bool skip_tc = o.baseline == "skip";
  TranscoderConfig tcc{cfg.d_in, cfg.d_out, o.tc_latents(), k, skip_tc, o.tc.rank_by_decoder_norm};

  const std::string tc_file = std::string(skip_tc ? "skip" : "topk") + "_transcoder.safetensors";
  io::CheckpointDir ckpt_dir(o.out, suffix);
  Dist* const d = o.dist;
  const bool par = d && d->comm;
  // Every rank builds the models the same way (and reads --resume itself); an error on any
  // rank stops all of them.
  auto build = [&] {
  if (!o.resume.empty()) {
    const auto [mpath, bpath] = resume_files(o.resume, tc_file, o.train_mxd);
    Config rc;
    if (o.train_mxd) {
      io::SafetensorsReader f(mpath);
      rc = io::read_config(f);
      mxd = std::make_unique<MxdModel<T>>(io::load_params<T>(f, rc), r.mxd_adamw, r.mxd_step, o.threads);
      io::load_optimizer(f, mxd->t.opt);
      start = mxd->t.opt.t;
    }
    if (o.baseline != "none") {
      MXD_CHECK(!bpath.empty(), o.resume, ": the checkpoint has no ", tc_file,
                " (use the --baseline it was trained with)");
      io::SafetensorsReader b(bpath);
      tc = std::make_unique<TranscoderModel<T>>(io::load_transcoder<T>(b, io::read_transcoder_config(b)),
                                                r.tc_adamw, r.tc_step, o.threads);
      io::load_optimizer(b, tc->t.opt);
      if (mxd) MXD_CHECK(tc->t.opt.t == start, bpath, " is at step ", tc->t.opt.t, " but ", mpath, " at ", start);
      else start = tc->t.opt.t;
    }
    check_resume_flags(o, k, mxd ? &rc : nullptr, tc ? &tc->t.p.config : nullptr);
    const index_t rin = mxd ? mxd->t.p.config.d_in : tc->t.p.config.d_in;
    const index_t rout = mxd ? mxd->t.p.config.d_out : tc->t.p.config.d_out;
    MXD_CHECK(rin == src.d_in() && rout == src.d_out(), o.resume, " expects d_in = ", rin,
              ", d_out = ", rout, " but the data has ", src.d_in(), ", ", src.d_out());
  } else {
    if (o.train_mxd) {
      Params<T> p(cfg);
      init_params(p, o.seed, o.norm_dec);
      mxd = std::make_unique<MxdModel<T>>(std::move(p), r.mxd_adamw, r.mxd_step, o.threads);
    }
    if (o.baseline != "none") {
      TranscoderParams<T> tp(tcc);
      if (o.tc.tied_init) train::init_transcoder_tied(tp, o.seed + 1, o.tc.init_norm);
      else init_transcoder(tp, o.seed + 1);
      tc = std::make_unique<TranscoderModel<T>>(std::move(tp), r.tc_adamw, r.tc_step, o.threads);
    }
  }
  if ((r.mxd_step.aux.enabled() || r.tc_step.aux.enabled()) && !o.resume.empty()) {
    const auto files = resume_files(o.resume, tc_file, o.train_mxd);
    if (mxd) mxd->resume_aux(files.first);
    if (tc) tc->resume_aux(files.second);
  }
  if (par) {
    if (mxd) mxd->distribute(*d->comm, d->mode);
    if (tc) tc->distribute(*d->comm, Parallel::data);  // the baseline is data-parallel in both modes
  }
  };
  if (par) together(*d, build);
  else build();
  // This rank's rows of every batch.
  std::vector<index_t> batch_rows{o.batch};
  if (par) together(*d, [&] { batch_rows = parallel::batch_rows(o.batch, d->size()); });
  const index_t row0 = par ? parallel::offsets(batch_rows)[d->rank()] : 0;
  const index_t my_rows = batch_rows[par ? d->rank() : 0];
  if (mxd) mxd->rows = batch_rows;
  if (tc) tc->rows = batch_rows;
  // start == steps: a run killed after its last checkpoint; it only evaluates and reports.
  MXD_CHECK(start <= o.steps, "--steps = ", o.steps, " but the checkpoint is already at step ", start);
  if (o.cuda) {
    if (mxd) mxd->to_gpu(o.math);
    if (tc) tc->to_gpu(o.math);
  }
  const index_t B = o.batch;
  Tensor<T> x, y;
  double time_mxd = 0, time_tc = 0, sum_mxd = 0, sum_tc = 0;
  index_t in_window = 0;
  Series c_mxd, c_tc;
  c_mxd.name = "mxd" + suffix;
  c_tc.name = (tc ? tc->name : std::string()) + suffix;
  std::vector<double> col_step, col_mxd, col_tc;
  // A k sweep's log.csv has a column per model and k, so run() writes it after each k.
  TrainLog log;
  const bool writer = !par || d->root();
  if (!sweep && writer) {
    const std::string resumed_dir = o.resume.empty() ? std::string()
                                    : std::filesystem::is_directory(o.resume) ? o.resume
                                                                              : io::parent_dir(o.resume);
    std::vector<std::string> names;
    std::vector<Series*> logged;
    if (mxd) {
      names.push_back("mxd");
      logged.push_back(&c_mxd);
    }
    if (tc) {
      names.push_back(tc->name);
      logged.push_back(&c_tc);
    }
    log.open((std::filesystem::path(o.out) / "log.csv").string(), names, start,
             (std::filesystem::path(resumed_dir) / "log.csv").string(), logged);
  }
  Progress progress(o.steps, start, o.progress_every, sweep ? "k " + std::to_string(k) + ": " : "");
  using clock = std::chrono::steady_clock;
  // Commits both models after `steps_done` steps as one pair (CheckpointDir).
  index_t committed = start;
  // Under --parallel rank 0 writes (after gathering sharded experts); the others wait for it.
  auto commit = [&](index_t steps_done) {
    if (mxd) mxd->gather_for_save();
    auto write = [&] {
      if (par && !d->root()) return;
      ckpt_dir.commit(steps_done, [&](const std::string& folder) {
        if (mxd) mxd->save(folder + "/mxd.safetensors");
        if (tc) tc->save(folder + "/" + tc->name + ".safetensors");
      });
      log.sync();  // the log is as durable as the checkpoint
    };
    if (par) together(*d, write);
    else write();
    committed = steps_done;
  };
  // A training error names the step and where the last good pair is.
  auto stopped = [&](index_t step, const std::string& what, const char* hint) {
    const std::string last =
        committed > start ? "; the last good checkpoint (step " + std::to_string(committed) +
                                ") is the one " + ckpt_dir.manifest() + " names"
        : o.resume.empty() ? std::string("; no checkpoint was written")
                           : "; the checkpoint resumed from (step " + std::to_string(start) +
                                 ") is unchanged";
    return Error(detail::concat("training stopped at step ", step, ": ", what, hint, last));
  };
  // A failed commit says what failed and why (the --lr hint is for losses only). One that
  // failed after its commit point (linking the stable names) left its set to resume from.
  auto failed_commit = [&](index_t step, index_t steps_done, const char* what) {
    try {
      if (ckpt_dir.latest().step == steps_done) committed = steps_done;
    } catch (const Error&) {  // no readable manifest: nothing newer to point at
    }
    return stopped(step, detail::concat("the checkpoint of step ", steps_done, " failed: ", what), "");
  };
  auto commit_at = [&](index_t step, index_t steps_done) {
    try {
      commit(steps_done);
    } catch (const Error& e) {
      throw failed_commit(step, steps_done, e.what());
    } catch (const std::filesystem::filesystem_error& e) {
      throw failed_commit(step, steps_done, e.what());
    }
  };
  // The stop signal any rank received (signals.hpp), the same on every rank; 0: none.
  auto interrupted = [&] {
    const int sig = stop_signal();
    return par ? -d->comm->all_min(-sig) : sig;
  };
  const char* lr_hint = " (try a smaller --lr)";
  for (index_t step = start; step < o.steps; ++step) {
    try {
      if (par) {
        if (mxd) mxd->rows = batch_rows;
        if (tc) tc->rows = batch_rows;
        together(*d, [&] { src.train_rows(static_cast<std::uint64_t>(step), B, row0, my_rows, x, y); });
      } else {
        src.train_batch(static_cast<std::uint64_t>(step), B, x, y);
      }
    } catch (const Error& e) {
      throw stopped(step, e.what(), "");
    }
    auto t0 = clock::now();
    double l_mxd = 0, l_tc = 0;
    const char* model = "the MxD";
    try {
      if (mxd) l_mxd = mxd->train_step(x, y);
      auto t1 = clock::now();
      time_mxd += std::chrono::duration<double>(t1 - t0).count();
      if (tc) {
        model = "the baseline";
        l_tc = tc->train_step(x, y);
        time_tc += std::chrono::duration<double>(clock::now() - t1).count();
      }
    } catch (const parallel::TimeoutError& e) {  // a silent rank, not the learning rate
      throw stopped(step, std::string(model) + ": " + e.what(), "");
    } catch (const Error& e) {
      throw stopped(step, std::string(model) + ": " + e.what(), lr_hint);
    }
    sum_mxd += l_mxd;
    sum_tc += l_tc;
    // Rows at multiples of --log-every, whatever step a run resumed at: a resumed log has the
    // rows of an uninterrupted one.
    ++in_window;
    if ((step + 1) % o.log_every == 0 || step + 1 == o.steps) {
      col_step.push_back(double(step + 1));
      if (mxd) {
        col_mxd.push_back(sum_mxd / double(in_window));
        c_mxd.x.push_back(double(step + 1));
        c_mxd.y.push_back(sum_mxd / double(in_window));
      }
      if (tc) {
        col_tc.push_back(sum_tc / double(in_window));
        c_tc.x.push_back(double(step + 1));
        c_tc.y.push_back(sum_tc / double(in_window));
      }
      try {
        std::vector<double> logged;
        if (mxd) logged.push_back(col_mxd.back());
        if (tc) logged.push_back(col_tc.back());
        log.add(step + 1, logged);
      } catch (const Error& e) {
        throw stopped(step, e.what(), "");
      }
      sum_mxd = sum_tc = 0;
      in_window = 0;
    }
    std::vector<ModelProgress> now;
    if (mxd) now.push_back({"mxd", l_mxd, time_mxd});
    if (tc) now.push_back({tc->name, l_tc, time_tc});
    if (!par || d->root()) progress.update(step, B, now);
    if (o.checkpoint_every > 0 && (step + 1) % o.checkpoint_every == 0 && step + 1 < o.steps)
      commit_at(step, step + 1);
    if (step + 1 < o.steps) {
      if (const int sig = interrupted()) {
        if (committed != step + 1) commit_at(step, step + 1);
        throw Interrupted{sig, step + 1, sweep ? k : 0, o.out};
      }
    }
  }

  commit_at(o.steps, o.steps);
  try {
    log.close();
  } catch (const Error& e) {
    throw stopped(o.steps, e.what(), "");
  }
  if (const int sig = interrupted()) throw Interrupted{sig, o.steps, sweep ? k : 0, o.out};
  if (mxd) mxd->trained_memory = mxd->memory_bytes();
  if (tc) tc->trained_memory = tc->memory_bytes();
  const double tokens = double(o.steps - start) * double(B);
  auto rate = [&](double seconds) { return seconds > 0 ? tokens / seconds : 0.0; };
  std::vector<Row> rows;
  if (log_cols.empty()) log_cols.push_back(col_step);
  if (mxd) {
    rows.push_back({"mxd", mxd->n_params(), mxd->k(), evaluate(*mxd, src, B, d), rate(time_mxd), {}, {}, {},
                    -1, r.mxd_step.aux});
    add_rank_figures(rows.back(), *mxd, d, o.steps - start);
    if (r.mxd_step.aux.enabled()) rows.back().train_dead = mxd->train_dead_fraction();
    log_cols.push_back(col_mxd);
    log_names.push_back("mxd" + suffix);
    curves.push_back(c_mxd);
  }
  if (tc) {
    rows.push_back({tc->name, tc->n_params(), tc->k(), evaluate(*tc, src, B, d), rate(time_tc), {}, {}, {},
                    -1, r.tc_step.aux});
    add_rank_figures(rows.back(), *tc, d, o.steps - start);
    if (r.tc_step.aux.enabled()) rows.back().train_dead = tc->train_dead_fraction();
    log_cols.push_back(col_tc);
    log_names.push_back(tc->name + suffix);
    curves.push_back(c_tc);
  }
  return rows;
}

template <class T>
int run(const Options& o) {
  if (o.dist && o.dist->comm) together(*o.dist, [&] { check_train_memory<T>(o); });
  else check_train_memory<T>(o);
  std::unique_ptr<train::DataSource<T>> src;
  if (o.dist && o.dist->comm) {
    // Each rank opens the data itself; they must all see the same rows.
    together(*o.dist, [&] { src = make_source<T>(o); });
    const auto* files = dynamic_cast<const train::ActivationFiles<T>*>(src.get());
    o.dist->comm->check_same(
        "the data (d_in, d_out, training rows, held-out rows)",
        detail::concat(src->d_in(), ", ", src->d_out(), ", ", files ? files->train_rows_total() : 0,
                       ", ", src->eval_rows()));
  } else {
    src = make_source<T>(o);
  }
  Options opt = o;
  opt.layer.d_in = src->d_in();
  opt.layer.d_out = src->d_out();
  std::vector<Row> rows;
  std::vector<Series> curves;
  std::vector<std::vector<double>> log_cols;
  std::vector<std::string> log_names;
  const bool sweep = o.ks.size() > 1;
  MXD_CHECK(!(sweep && !o.resume.empty()), "--resume cannot be combined with a k sweep");
  const bool writer = !(o.dist && o.dist->comm) || o.dist->root();
  for (std::size_t ki = 0; ki < o.ks.size(); ++ki) {
    const std::size_t first = curves.size();
    auto r = train_at<T>(opt, o.ks[ki], *src, sweep, curves, log_cols, log_names);
    rows.insert(rows.end(), r.begin(), r.end());
    for (std::size_t c = first; c < curves.size(); ++c) {  // one colour per k
      curves[c].color = static_cast<int>(ki);
      curves[c].dashed = c > first;  // the baseline, dashed beside its MxD
    }
    // A single k's log.csv grew as it trained (TrainLog); a sweep's gains its columns per k.
    if (sweep && writer) write_sweep_log((std::filesystem::path(o.out) / "log.csv").string(), log_names, log_cols);
  }
  const Dist* d = o.dist;
  const bool par = d && d->comm;
  if (par && !d->root()) return 0;  // rank 0 prints and writes
  report(o, rows, curves);
  return 0;
}

int train_command(int argc, char** argv, Dist& dist) {
  if (dist.comm) {
    dist.comm->check_same("the command line of mxd train (all but --threads)", command_line(argc, argv));
    dist.same_everywhere = true;  // until the data is opened, every rank fails alike
  }
  Args args(argc, argv, argc < 2 ? argc : 2, train_flags(), train_switches());
  if (args.help()) {
    std::printf(train_help, layer_flags_help(/*with_k=*/false).c_str());
    return 0;
  }
  MXD_CHECK(args.positional().empty(), "mxd train takes no positional argument, got '",
            args.positional().front(), "'");
  const Options o = parse_options(args, dist);
  std::unique_ptr<OutLock> out_lock;  // held until the run returns
  together(dist, [&] {
    if (dist.root()) out_lock = prepare_out_dir(o);
  });
  dist.same_everywhere = false;
  if (o.dtype == "bf16") return run<float>(o);
  if (o.dtype == "f32") return run<float>(o);
  if (o.dtype == "f64") return run<double>(o);
  throw Error("--dtype = '" + o.dtype + "' is not f32, f64 or bf16");
}

}  // namespace training

int run_train(int argc, char** argv) {
  using namespace training;
  Dist dist = start_dist(argc, argv);
  install_stop_signals();
  try {
    if (!dist.comm) return train_command(argc, argv, dist);
    return run_distributed(dist, [&] { return train_command(argc, argv, dist); });
  } catch (const Interrupted& i) {
    if (dist.root()) {
      if (i.sweep_k)
        std::fprintf(stderr, "%smxd: interrupted at step %lld of k = %lld; its checkpoints are in "
                     "%s (a k sweep cannot be resumed)\n", isatty(2) ? "\n" : "",
                     (long long)i.step, (long long)i.sweep_k, i.out.c_str());
      else
        std::fprintf(stderr, "%smxd: interrupted at step %lld; resume with --resume %s\n",
                     isatty(2) ? "\n" : "", (long long)i.step, i.out.c_str());
    }
    end_of_interrupted_run(128 + i.signal);
    return 128 + i.signal;
  }
}

}  // namespace mxd::cli
