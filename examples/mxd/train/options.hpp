// SPDX-License-Identifier: MIT
// mxd train: its flags, their help and their parsing.
#pragma once

#include <cmath>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <mxd/mxd.hpp>
#include <mxd/train/aux_loss.hpp>
#include <mxd/train/baseline.hpp>
#include <mxd/io/safetensors.hpp>
#include <mxd/train/data.hpp>
#include <mxd/train/step.hpp>

#include "../cli.hpp"
#include "../cuda.hpp"
#include "../parallel.hpp"

namespace mxd::cli::training {

const char* const train_help =
    "usage: mxd train [options]\n\n"
    "Trains an MxD and a parameter-matched TopK transcoder (same k, same batches, same steps)\n"
    "to reproduce y from x, then evaluates both on held-out pairs. With no options: the\n"
    "built-in default, a teacher GELU MLP 64 -> 256 -> 64 with x ~ N(0, I) and weights\n"
    "N(0, 1/fan_in) (seed 0), an MxD 64 -> 256 -> 64 with 1792 experts and a transcoder of\n"
    "2048 latents (both ~266k parameters), k = 32, 2000 steps of 512 rows. Its time is that of\n"
    "the two models' steps and the teacher's data: under a minute on an idle 2-core x86-64\n"
    "machine, longer when other processes share the cores (examples/mxd/README.md, \"Training\").\n\n"
    "data:\n"
    "  --data FILE       safetensors with x [T, d_in] and y [T, d_out] (F32/F16/BF16/F64);\n"
    "                    repeatable; rows are streamed, the last --eval-fraction of each file\n"
    "                    is held out (default 0.05)\n"
    "  --teacher-hidden H  hidden width of the teacher MLP (default 256; no --data)\n"
    "  --eval-rows N     held-out teacher rows (default 8192)\n"
    "layer:\n"
    "%s"
    "  --expansion m     transcoder width m * d_in (default 32); --experts defaults to the\n"
    "                    parameter-matched count for it\n"
    "  --latents M       transcoder width M exactly (instead of --expansion); --experts then\n"
    "                    defaults to the count nearest the transcoder's parameters, like for\n"
    "                    like: with --skip, MxD+skip against a skip transcoder of M latents\n"
    "                    (equal counts when M = experts + d_hidden, without --glu)\n"
    "  --models LIST     the models to train, from mxd, topk, skip (at most one transcoder),\n"
    "                    e.g. mxd,topk or skip; instead of --baseline (default mxd,topk)\n"
    "  --k K[,K...]      experts/latents per row; a list sweeps k and plots the frontier\n"
    "  --baseline B      topk | skip | none (default topk)\n"
    "  --no-norm-dec     do not keep expert vectors (and transcoder decoder rows) unit norm\n"
    "baseline recipe (the transcoder only; the MxD always trains by its authors' recipe).\n"
    "The default is SAELens's: it trains a better transcoder than the MxD authors' recipe\n"
    "(lower spliced CE in examples/lm's LM, where it reconstructs as well as SAELens 6.54\n"
    "itself; lower FVU on the built-in teacher at 1000 steps of 1024 rows and lr 4e-4 and on\n"
    "the default job, three seeds each, with more latents dead; examples/lm/README.md, \"The\n"
    "baseline's recipe\"), so MxD is compared with a baseline as strong as the community's:\n"
    "  --tc-recipe R     saelens (default) | authors: SAELens 6.x's TopK recipe sets the\n"
    "                    following flags to sse, tied (uniform when d_in != d_out and no\n"
    "                    --tc-recipe is given), 1, 0, d_in / 2, saelens, off, on; authors'\n"
    "                    to nmse_ref, uniform, 0, --warmup, --aux-k, normalized, as the MxD,\n"
    "                    off (each may still be given)\n"
    "  --tc-loss L       sse (SAELens's: squared error summed over a row, mean over rows) |\n"
    "                    mse (mean over every value) | nmse_ref (the authors')\n"
    "  --tc-init I       tied (SAELens's): decoder rows at norm 0.1, encoder their transpose\n"
    "                    (needs d_in == d_out) | uniform (the authors')\n"
    "  --tc-clip-grad X  clip the baseline's gradient to global L2 norm X (0: off)\n"
    "  --tc-warmup W     the baseline's warm-up steps\n"
    "  --tc-aux-k K      AuxK for the baseline alone (0: off)\n"
    "  --tc-aux-form F   saelens (SAELens's: pre-activations without relu rank the dead latents\n"
    "                    and weight their decoder rows; loss min(dead / k_aux, 1) x the rows'\n"
    "                    summed squared error, weight 1, dead after 1001 batches unselected,\n"
    "                    unless --aux-coef or --dead-window is given) | normalized (the MxD's)\n"
    "  --tc-norm-dec on|off  unit-norm decoder rows for the TopK baseline\n"
    "  --tc-rank-by-dec-norm on|off  select the latents by relu(pre) |W_dec row| (SAELens's\n"
    "                    rescale_acts_by_decoder_norm; saved with the model)\n"
    "training:\n"
    "  --batch B         rows per step (default 512)\n"
    "  --steps S         total steps (default 2000)\n"
    "  --lr LR           AdamW learning rate (default 1e-3; the paper uses 4e-4)\n"
    "  --warmup W        linear warm-up steps (default 100; the paper uses 5000)\n"
    "  --seed S          seed of initialisation and data order (default 0)\n"
    "  --threads N       CPU threads (default: all cores; results do not depend on it)\n"
    "  --parallel M      under mpirun -np P: data (each rank trains its rows of every batch,\n"
    "                    gradients summed) or experts (the MxD's experts split over the ranks,\n"
    "                    its dense part and the baseline data-parallel); the result is the\n"
    "                    single process's with the same --batch. Rank 0 prints and writes\n"
    "                    DIR; --data files must be readable by every rank (each reads its rows)\n"
    "  --timeout S       with --parallel: a rank that waits S seconds for another in a\n"
    "                    collective ends every rank, naming the silent ones (default 600;\n"
    "                    0: wait forever); more than the longest checkpoint write\n"
    "  --dtype f32|f64   precision (default f32)\n"
    "  --device cpu|cuda where both models train (default cpu; cuda needs a CUDA build)\n"
    "  --tf32            with --device cuda: float GEMMs on TF32 tensor cores\n"
    "  --dtype bf16      with --device cuda: float tensors, GEMMs on bf16 copies of their inputs\n"
    "  --log-every N     steps per log.csv row (default 10)\n"
    "  --progress-every S  when stderr is not a terminal, a progress line (step, loss, tokens/s,\n"
    "                    ETA) every S seconds (default 10; 0: every step)\n"
    "  --checkpoint-every N  commit a checkpoint pair every N steps (default 500; 0: at the end only)\n"
    "                    and when SIGINT or SIGTERM ends the run after the current step (a\n"
    "                    second one stops at once)\n"
    "  --aux-k K         AuxK auxiliary loss for dead experts (default 0: off, the authors'\n"
    "                    recipe; the baseline's too with --tc-recipe authors, SAELens's sets\n"
    "                    its own, --tc-aux-k): per row the K dead units with the largest gate\n"
    "                    scores model the residual (Gao et al. 2024 use about d_in / 2)\n"
    "  --aux-coef A      its weight (default 1/32, Gao et al.'s alpha; needs AuxK on; given,\n"
    "                    it is the baseline's too, as --dead-window)\n"
    "  --dead-window W   a unit is dead when none of the last W training tokens selected it\n"
    "                    (default 8192, the held-out rows the dead fraction counts; needs AuxK)\n"
    "  --out DIR         output directory (default mxd_out), locked while the run lasts; one\n"
    "                    holding an earlier run's checkpoints is refused without --overwrite\n"
    "                    or --resume\n"
    "  --overwrite       replace the earlier run in DIR (its checkpoint set and outputs)\n"
    "  --resume CKPT     continue from DIR/mxd.safetensors or DIR: the last checkpoint pair that\n"
    "                    DIR/checkpoint.json names (MxD and baseline at the same step); a layer\n"
    "                    flag given must have the checkpoint's value; log.csv continues\n\n"
    "writes to DIR: mxd.safetensors, topk_transcoder.safetensors (checkpoints with optimizer\n"
    "state; the pair is committed atomically, see checkpoint.json), log.csv, metrics.json,\n"
    "loss.svg, and with a k sweep frontier.svg;\n"
    "prints a table of parameters, k, NMSE (reference loss), FVU, dead fraction and tokens/s.\n";

struct Options {
  Config layer;
  index_t expansion = 32;
  std::vector<index_t> ks;
  std::string baseline = "topk";
  bool norm_dec = true;
  index_t batch = 512, steps = 2000, warmup = 100, log_every = 10, eval_rows = 8192;
  index_t checkpoint_every = 500;
  index_t teacher_hidden = 256;
  double lr = 1e-3, eval_fraction = 0.05, progress_every = 10;
  std::uint64_t seed = 0;
  int threads = 0;
  bool cuda = false;
  std::string dtype = "f32";     // --dtype f32|f64|bf16
  std::string math = "fp32";  // --device cuda: how float GEMMs run (fp32, tf32, bf16)
  std::string out = "mxd_out", resume;
  bool overwrite = false;           // --overwrite: a fresh run may replace an earlier one in out
  std::set<std::string> layer_given;  // the layer flags on the command line (--resume checks them)
  std::vector<std::string> data;
  train::AuxK aux;  // --aux-k, --aux-coef, --dead-window (off by default)
  bool train_mxd = true;            // --models without mxd: the baseline alone
  index_t latents = 0;              // --latents: the transcoder's width (0: expansion * d_in)
  train::BaselineRecipe tc;         // --tc-*: how the baseline trains
  index_t tc_latents() const { return latents > 0 ? latents : expansion * layer.d_in; }
  Dist* dist = nullptr;  // --parallel: the ranks' communicator and mode
};

inline std::vector<index_t> parse_ks(const std::string& s) {
  std::vector<index_t> ks;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    std::size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MXD_CHECK(used == item.size() && !item.empty() && v > 0, "--k: '", item,
              "' is not a positive integer (in '", s, "')");
    ks.push_back(v);
  }
  MXD_CHECK(!ks.empty(), "--k: empty list");
  return ks;
}


// The command line but --threads (which does not change results): what ranks must share.
inline std::string command_line(int argc, char** argv) {
  std::string s;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads") {
      ++i;
      continue;
    }
    if (a.rfind("--threads=", 0) == 0) continue;
    s += a + " ";
  }
  return s;
}

// The flags and switches mxd train takes.
inline std::set<std::string> train_flags() {
  std::set<std::string> flags = layer_flags();
  for (const char* f : {"data", "teacher-hidden", "eval-rows", "eval-fraction", "expansion",
                        "baseline", "batch", "steps", "lr", "warmup", "seed", "threads", "dtype",
                        "device", "log-every", "progress-every", "checkpoint-every", "out", "resume",
                        "aux-k", "aux-coef", "dead-window", "latents", "models", "tc-recipe",
                        "tc-loss", "tc-init", "tc-clip-grad", "tc-warmup", "tc-aux-k", "tc-aux-form",
                        "tc-norm-dec", "tc-rank-by-dec-norm", "parallel", "timeout"})
    flags.insert(f);
  return flags;
}
inline std::set<std::string> train_switches() {
  std::set<std::string> switches = layer_switches();
  switches.insert({"no-norm-dec", "tf32", "overwrite"});
  return switches;
}

// The training and held-out rows: --data files, or the teacher MLP.
template <class T>
std::unique_ptr<train::DataSource<T>> make_source(const Options& o) {
  if (!o.data.empty())
    return std::make_unique<train::ActivationFiles<T>>(o.data, o.eval_fraction, o.seed);
  return std::make_unique<train::Teacher<T>>(o.layer.d_in, o.teacher_hidden, o.layer.d_out,
                                             o.seed, o.eval_rows);
}


// How each model trains: the MxD's AdamW and step options, then the baseline's (its --tc-*
// recipe, train/baseline.hpp; defaults: the MxD's).
struct Recipes {
  AdamWConfig mxd_adamw;
  train::StepOptions mxd_step;
  AdamWConfig tc_adamw;
  train::StepOptions tc_step;
};
inline Recipes recipes(const Options& o) {
  Recipes r;
  r.mxd_adamw.lr = o.lr;
  r.mxd_adamw.warmup_steps = o.warmup;
  r.mxd_step.norm_dec = o.norm_dec;
  r.mxd_step.aux = o.aux;
  r.tc_adamw = r.mxd_adamw;
  if (o.tc.warmup >= 0) r.tc_adamw.warmup_steps = o.tc.warmup;
  r.tc_step = r.mxd_step;
  r.tc_step.loss = o.tc.loss;
  r.tc_step.clip_grad = o.tc.clip_grad;
  if (o.tc.norm_dec >= 0) r.tc_step.norm_dec = o.tc.norm_dec == 1;
  if (o.tc.aux_k >= 0) r.tc_step.aux.k = o.tc.aux_k;
  r.tc_step.aux.form = o.tc.aux_form;
  if (o.tc.aux_coef > 0) r.tc_step.aux.coef = o.tc.aux_coef;
  if (o.tc.aux_dead_batches > 0) r.tc_step.aux.dead_window = o.tc.aux_dead_batches * o.batch;
  return r;
}

// Reads mxd train's flags (the help was handled by the caller); the first error names the flag.
inline Options parse_options(Args& args, Dist& dist) {
  Options o;
  MXD_CHECK(!(args.has("latents") && args.has("expansion")), "--latents ", args.get("latents", ""),
            " and --expansion ", args.get("expansion", ""), ": give one of them (--latents is the "
            "transcoder's exact width, --expansion a multiple of d_in)");
  o.expansion = args.get_int("expansion", 32, 1, max_width);
  o.latents = args.has("latents") ? args.get_int("latents", 0, 1, max_width) : 0;
  if (args.has("models")) {  // which of the MxD and one transcoder train
    MXD_CHECK(!args.has("baseline"), "--models ", args.get("models", ""), " and --baseline ",
              args.get("baseline", ""), ": give one of them");
    const std::string list = args.get("models", "");
    bool m = false, t = false, sk = false;
    std::stringstream in(list);
    std::string item;
    while (std::getline(in, item, ',')) {
      bool* f = item == "mxd" ? &m : item == "topk" ? &t : item == "skip" ? &sk : nullptr;
      MXD_CHECK(f, "--models = '", list, "': '", item, "' is not mxd, topk or skip");
      MXD_CHECK(!*f, "--models = '", list, "': '", item, "' is given twice");
      *f = true;
    }
    MXD_CHECK((m || t || sk) && list.back() != ',', "--models = '", list,
              "' is not a list of mxd, topk, skip (e.g. mxd,topk)");
    MXD_CHECK(!(t && sk), "--models = '", list, "': topk and skip in one run are not supported "
              "(one transcoder per run); train them in two runs");
    o.train_mxd = m;
    o.baseline = t ? "topk" : sk ? "skip" : "none";
  }
  o.teacher_hidden = args.get_int("teacher-hidden", 256, 1, max_width);
  Config defaults;
  defaults.d_in = 64;
  defaults.d_hidden = 256;
  defaults.d_out = 64;
  defaults.activation = Activation::gelu;
  defaults.k = 32;
  o.data = args.all("data");
  // Sizes from the data files when given, so --experts can default to the matched count.
  if (!o.data.empty()) together(dist, [&] {  // a file missing on one rank stops all
    io::SafetensorsReader f(o.data.front());
    MXD_CHECK(f.info("x").shape.size() == 2 && f.info("y").shape.size() == 2, o.data.front(),
              ": x and y must be 2-D");
    MXD_CHECK(f.info("x").shape[1] > 0 && f.info("y").shape[1] > 0, o.data.front(),
              ": x and y must have positive widths d_in and d_out");
    defaults.d_in = f.info("x").shape[1];
    defaults.d_out = f.info("y").shape[1];
    defaults.d_hidden = 4 * defaults.d_in;
  });
  o.ks = parse_ks(args.get("k", "32"));
  Config sized = defaults;
  sized.d_in = args.get_int("d-in", defaults.d_in, 1, max_width);
  sized.d_hidden = args.get_int("d-hidden", defaults.d_hidden, 1, max_width);
  sized.d_out = args.get_int("d-out", defaults.d_out, 1, max_width);
  // The matched count is only the default: an explicit --experts needs no match to exist.
  if (!args.has("experts")) {
    if (o.latents == 0)
      defaults.n_experts = matched_experts(sized.d_in, sized.d_hidden, sized.d_out, o.expansion,
                                           args.flag("glu"), args.flag("skip"));
    else if (o.train_mxd)  // --latents: the nearest count, like for like (train/baseline.hpp)
      try {
        defaults.n_experts = train::experts_for_latents(sized.d_in, sized.d_hidden, sized.d_out,
                                                        o.latents, args.flag("glu"), args.flag("skip"));
      } catch (const Error& e) {
        throw Error(detail::concat("--latents ", o.latents, ": ", e.what(), "; give --experts"));
      }
    else  // no MxD trains: any valid count
      defaults.n_experts = std::max<index_t>(*std::max_element(o.ks.begin(), o.ks.end()), 1);
  }
  defaults.k = *std::min_element(o.ks.begin(), o.ks.end());
  o.layer = layer_config(args, defaults, /*read_k=*/false);
  for (index_t k : o.ks) {
    MXD_CHECK(!o.train_mxd || k <= o.layer.n_experts, "--k = ", k, " exceeds the ", o.layer.n_experts, " experts");
    MXD_CHECK(k <= o.tc_latents(), "--k = ", k, " exceeds the transcoder's ", o.tc_latents(), " latents");
  }
  if (!args.has("models")) o.baseline = args.get("baseline", "topk");
  MXD_CHECK(o.baseline == "topk" || o.baseline == "skip" || o.baseline == "none", "--baseline = '",
            o.baseline, "' is not topk, skip or none");
  MXD_CHECK(o.baseline != "skip" || o.layer.d_in == o.layer.d_out,
            "--baseline skip needs d_in == d_out");
  o.norm_dec = !args.flag("no-norm-dec");
  o.batch = args.get_int("batch", o.batch, 1, INT32_MAX);
  o.steps = args.get_int("steps", o.steps);
  o.warmup = args.get_int("warmup", o.warmup);
  o.log_every = args.get_int("log-every", o.log_every);
  o.checkpoint_every = args.get_int("checkpoint-every", o.checkpoint_every);
  o.eval_rows = args.get_int("eval-rows", o.eval_rows);
  o.eval_fraction = args.get_double("eval-fraction", o.eval_fraction);
  o.lr = args.get_double("lr", o.lr);
  o.progress_every = args.get_double("progress-every", o.progress_every);
  MXD_CHECK(o.progress_every >= 0, "--progress-every = ", o.progress_every, " must be >= 0");
  o.seed = static_cast<std::uint64_t>(args.get_int("seed", 0, 0));
  o.threads = threads_arg(args);
  o.out = args.get("out", o.out);
  o.resume = args.get("resume", "");
  o.overwrite = args.flag("overwrite");
  MXD_CHECK(!(o.overwrite && !o.resume.empty()),
            "--overwrite starts a fresh run and --resume continues one: give one of them");
  for (const char* f : {"d-in", "d-hidden", "d-out", "experts", "k", "activation", "glu", "skip", "expansion",
                        "latents", "tc-rank-by-dec-norm"})
    if (args.has(f)) o.layer_given.insert(f);
  MXD_CHECK(o.steps > 0, "--steps = ", o.steps, " must be positive");
  MXD_CHECK(o.warmup >= 0, "--warmup = ", o.warmup, " must be >= 0");
  MXD_CHECK(o.log_every > 0, "--log-every = ", o.log_every, " must be positive");
  MXD_CHECK(o.checkpoint_every >= 0, "--checkpoint-every = ", o.checkpoint_every,
            " must be >= 0 (0: at the end only)");
  MXD_CHECK(o.eval_rows > 0, "--eval-rows = ", o.eval_rows, " must be positive");
  MXD_CHECK(std::isfinite(o.lr) && o.lr > 0, "--lr = ", o.lr, " must be positive");
  MXD_CHECK(!o.out.empty(), "--out must not be empty");
  const std::string device = args.get("device", "cpu");
  MXD_CHECK(device == "cpu" || device == "cuda", "--device = '", device, "' is not cpu or cuda");
  o.cuda = device == "cuda";
  o.dtype = args.get("dtype", "f32");
  const std::string& dtype = o.dtype;
  MXD_CHECK(!args.flag("tf32") || (o.cuda && dtype == "f32"), "--tf32 needs --device cuda --dtype f32");
  MXD_CHECK(dtype != "bf16" || o.cuda, "--dtype bf16 needs --device cuda");
  o.math = dtype == "bf16" ? "bf16" : args.flag("tf32") ? "tf32" : "fp32";
  o.aux.k = args.get_int("aux-k", 0);
  o.aux.coef = args.get_double("aux-coef", o.aux.coef);
  o.aux.dead_window = args.get_int("dead-window", o.aux.dead_window);
  MXD_CHECK(o.aux.k >= 0, "--aux-k = ", o.aux.k, " must be >= 0 (0: off)");
  MXD_CHECK(o.aux.coef > 0, "--aux-coef = ", o.aux.coef, " must be positive");
  MXD_CHECK(o.aux.dead_window > 0, "--dead-window = ", o.aux.dead_window, " must be positive");
  // The baseline's recipe (--tc-*, train/baseline.hpp): a bundle, then each flag over it.
  // SAELens's by default: it trains the stronger baseline (examples/lm/README.md, "The
  // baseline's recipe"). Its tied init needs d_in == d_out; elsewhere the default starts
  // from the uniform init instead.
  const std::string recipe = args.get("tc-recipe", "saelens");
  MXD_CHECK(recipe == "authors" || recipe == "saelens", "--tc-recipe = '", recipe,
            "' is not authors or saelens");
  if (recipe == "saelens") o.tc = train::BaselineRecipe::saelens(o.layer.d_in);
  if (!args.has("tc-recipe") && o.layer.d_in != o.layer.d_out) o.tc.tied_init = false;
  if (args.has("tc-loss")) {
    const std::string v = args.get("tc-loss", "");
    MXD_CHECK(v == "nmse_ref" || v == "mse" || v == "sse", "--tc-loss = '", v,
              "' is not sse, mse or nmse_ref");
    o.tc.loss = parse_loss(v);
  }
  if (args.has("tc-init")) {
    const std::string v = args.get("tc-init", "");
    MXD_CHECK(v == "uniform" || v == "tied", "--tc-init = '", v, "' is not uniform or tied");
    o.tc.tied_init = v == "tied";
  }
  if (args.has("tc-clip-grad")) {
    o.tc.clip_grad = args.get_double("tc-clip-grad", 0);
    MXD_CHECK(std::isfinite(o.tc.clip_grad) && o.tc.clip_grad >= 0, "--tc-clip-grad = ",
              o.tc.clip_grad, " must be >= 0 (0: off)");
  }
  if (args.has("tc-warmup")) o.tc.warmup = args.get_int("tc-warmup", 0, 0);
  if (args.has("tc-aux-k")) o.tc.aux_k = args.get_int("tc-aux-k", 0, 0);
  if (args.has("tc-aux-form")) {
    const std::string v = args.get("tc-aux-form", "");
    MXD_CHECK(v == "saelens" || v == "normalized", "--tc-aux-form = '", v,
              "' is not saelens or normalized");
    if (v == "saelens") o.tc.use_saelens_auxk();
    else o.tc.aux_form = train::AuxKForm::normalized;
  }
  // Given, --aux-coef and --dead-window set the baseline's AuxK too, over its recipe's.
  if (args.has("aux-coef")) o.tc.aux_coef = -1;
  if (args.has("dead-window")) o.tc.aux_dead_batches = -1;
  if (args.has("tc-norm-dec")) {
    const std::string v = args.get("tc-norm-dec", "");
    MXD_CHECK(v == "on" || v == "off", "--tc-norm-dec = '", v, "' is not on or off");
    o.tc.norm_dec = v == "on";
  }
  if (args.has("tc-rank-by-dec-norm")) {
    const std::string v = args.get("tc-rank-by-dec-norm", "");
    MXD_CHECK(v == "on" || v == "off", "--tc-rank-by-dec-norm = '", v, "' is not on or off");
    o.tc.rank_by_decoder_norm = v == "on";
  }
  bool tc_given = false;
  for (const char* f : {"tc-recipe", "tc-loss", "tc-init", "tc-clip-grad", "tc-warmup", "tc-aux-k",
                        "tc-aux-form", "tc-norm-dec", "tc-rank-by-dec-norm"})
    tc_given = tc_given || args.has(f);
  MXD_CHECK(!tc_given || o.baseline != "none",
            "--tc-recipe and --tc-* set the transcoder baseline's training, but none trains "
            "(--baseline none, or --models without topk or skip)");
  if (o.baseline == "none") o.tc = {};  // nothing to train: no AuxK for the dead-window check
  MXD_CHECK(!o.tc.tied_init || o.layer.d_in == o.layer.d_out, "--tc-init tied needs d_in == d_out "
            "(the encoder starts as the decoder's transpose), got ", o.layer.d_in, " and ", o.layer.d_out);
  MXD_CHECK(!args.has("tc-aux-form") || o.tc.aux_k > 0 || (o.tc.aux_k < 0 && o.aux.enabled()),
            "--tc-aux-form ", args.get("tc-aux-form", ""), " needs the baseline's AuxK on "
            "(--tc-aux-k K > 0)");
  const bool any_aux = o.aux.enabled() || o.tc.aux_k > 0;
  MXD_CHECK(any_aux || (!args.has("aux-coef") && !args.has("dead-window")),
            "--aux-coef and --dead-window need --aux-k K > 0 (the AuxK loss is off without it)");
  if (o.cuda) require_cuda();
  MXD_CHECK(!(dist.comm && o.cuda), "--parallel runs on the CPU (--device cuda is one process)");
  MXD_CHECK(!(dist.comm && dist.mode == Parallel::experts && o.aux.enabled() && o.train_mxd),
            "--aux-k ", o.aux.k, " is not supported for the MxD with --parallel experts (its dead "
            "experts would be sharded too); --parallel data, or --tc-aux-k for the baseline alone");
  if (dist.comm) o.dist = &dist;
  const double timeout = args.get_double("timeout", default_timeout);
  MXD_CHECK(timeout >= 0, "--timeout = ", timeout, " must be >= 0 (0: wait forever)");
  if (dist.comm) dist.comm->timeout = timeout;
  return o;
}

}  // namespace mxd::cli::training
