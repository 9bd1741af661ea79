// SPDX-License-Identifier: MIT
// mxd train: trains an MxD and a parameter-matched TopK (or skip) transcoder on the same
// stream of (x, y) pairs, then evaluates both on held-out pairs.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/parallel/data_parallel.hpp>
#include <mxd/parallel/expert_parallel.hpp>
#include <mxd/init.hpp>
#include <mxd/io/checkpoint.hpp>
#include <mxd/train/dead_units_io.hpp>
#include <mxd/io/durable.hpp>
#include <mxd/mxd.hpp>
#include <mxd/train/aux_loss.hpp>
#include <mxd/train/data.hpp>

#include "cli.hpp"
#include "commands.hpp"
#include "cuda.hpp"
#include "parallel.hpp"
#include "memory.hpp"
#include "progress.hpp"
#include "svg.hpp"

namespace mxd::cli {
namespace {

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
    "  --k K[,K...]      experts/latents per row; a list sweeps k and plots the frontier\n"
    "  --baseline B      topk | skip | none (default topk)\n"
    "  --no-norm-dec     do not keep expert vectors (and transcoder decoder rows) unit norm\n"
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
    "  --aux-k K         AuxK auxiliary loss for dead experts/latents (both models; default 0:\n"
    "                    off, the authors' recipe): per row the K dead units with the largest\n"
    "                    gate scores model the residual (Gao et al. 2024 use about d_in / 2)\n"
    "  --aux-coef A      its weight (default 1/32, Gao et al.'s alpha; needs --aux-k)\n"
    "  --dead-window W   a unit is dead when none of the last W training tokens selected it\n"
    "                    (default 8192, the held-out rows the dead fraction counts; needs --aux-k)\n"
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
  std::string math = "fp32";  // --device cuda: how float GEMMs run (fp32, tf32, bf16)
  std::string out = "mxd_out", resume;
  bool overwrite = false;           // --overwrite: a fresh run may replace an earlier one in out
  std::set<std::string> layer_given;  // the layer flags on the command line (--resume checks them)
  std::vector<std::string> data;
  train::AuxK aux;  // --aux-k, --aux-coef, --dead-window (off by default)
  Dist* dist = nullptr;  // --parallel: the ranks' communicator and mode
};

// Sums for NMSE (reference), FVU and expert usage over held-out rows.
struct Eval {
  double nmse = 0, fvu = 0, dead_fraction = 0;
};

template <class T>
struct Accumulator {
  double nmse_sum = 0, err_sum = 0;
  index_t elements = 0, rows = 0;
  std::vector<double> t_sum, t_sq;
  std::vector<char> used;

  Accumulator(index_t O, index_t n_units) : t_sum(O), t_sq(O), used(n_units, 0) {}

  void add(const Tensor<T>& y, const Tensor<T>& t, const Tensor<std::int32_t>& idx,
           const Tensor<T>& val) {
    for (index_t r = 0; r < y.rows(); ++r) {
      double tn = 0;
      for (index_t o = 0; o < y.cols(); ++o) tn += double(t(r, o)) * double(t(r, o));
      tn = std::sqrt(tn);
      for (index_t o = 0; o < y.cols(); ++o) {
        const double e = double(y(r, o)) - double(t(r, o));
        nmse_sum += e * e / tn;
        err_sum += e * e;
        t_sum[o] += double(t(r, o));
        t_sq[o] += double(t(r, o)) * double(t(r, o));
      }
    }
    for (index_t i = 0; i < idx.size(); ++i)
      if (val[i] > T(0)) used[idx[i]] = 1;
    elements += y.size();
    rows += y.rows();
  }

  Eval result() const {
    double var = 0;
    for (std::size_t o = 0; o < t_sum.size(); ++o)
      var += t_sq[o] - t_sum[o] * t_sum[o] / double(rows);
    index_t dead = 0;
    for (char u : used) dead += !u;
    return {nmse_sum / double(elements), err_sum / var, double(dead) / double(used.size())};
  }
};

// The dead-unit state saved beside a checkpoint with --aux-k: DIR/NAME.safetensors ->
// DIR/NAME.dead.safetensors (in the same checkpoint set, so it is committed with the model).
std::string dead_file(const std::string& checkpoint) {
  const std::filesystem::path p(checkpoint);
  return (p.parent_path() / (p.stem().string() + ".dead.safetensors")).string();
}

// One model in training: its parameters, gradients, workspace and optimizer on the host, or
// with --device cuda a DeviceModel holding them on the GPU (p and opt are then refreshed from
// it when the model is saved).
template <class T, template <class, class> class Set, class Workspace>
struct Model {
  Set<T, cpu> p, g;
  Workspace ws;
  AdamW<T, cpu, Set<T, cpu>> opt;
  bool norm_dec;
  std::unique_ptr<DeviceModel<T, Set>> gpu;
  Tensor<T> pred, dy;                        // host scratch of train_step
  Tensor<std::int32_t> gpu_idx;              // the GPU's last selection, copied back
  Tensor<T> gpu_val;
  train::AuxK aux;                           // --aux-k: off unless enabled
  train::DeadUnits dead;
  train::AuxKWorkspace<T> aux_ws;
  // --parallel: the ranks' communicator (null for one process), every rank's rows of the
  // current batch, the gradient sums, and the bytes this rank sent during the model's steps.
  parallel::Communicator* comm = nullptr;
  std::vector<index_t> rows;
  parallel::GradientReducer<T> reduce;
  double bytes_sent = 0;
  double trained_memory = 0;  // memory_bytes() after the last training step (workspaces shrink for evaluation)

  Model(Set<T, cpu> params, const AdamWConfig& oc, bool nd, int threads)
      : p(std::move(params)), g(p.config), opt(p, oc), norm_dec(nd) {
    ws.ctx.threads = threads;
  }
  // Moves training to the GPU from the current parameters and optimizer state.
  void to_gpu(const std::string& math) { gpu = make_cuda_model<T, Set>(p, opt, norm_dec, math); }

  // One step on (x, target); returns the reference loss before the update. On the host a
  // non-finite loss stops here, before backward and the update (the NaN/Inf policy).
  // Under --parallel, x and target are this rank's rows of the batch and the loss is the
  // whole batch's (every rank's share of the mean, summed).
  template <class Layer>
  double train_step(Layer& layer, const Tensor<T>& x, const Tensor<T>& target) {
    if (gpu) return gpu->train_step(x, target);
    const std::uint64_t sent = comm ? comm->bytes_sent : 0;
    pred.resize(x.rows(), target.cols(), false);
    dy.resize(x.rows(), target.cols(), false);
    layer.forward(x, pred);
    double l = loss<T>(Loss::nmse_ref, pred.view(), target.view(), dy.view(),
                       comm ? parallel::offsets(rows).back() : 0);
    if (comm) {
      comm->agree(std::isfinite(l), detail::concat("the loss became ", l, " (no weight was updated)"));
      Tensor<double> sum(1, 1);
      sum[0] = l;
      comm->all_reduce(sum.view());
      l = sum[0];
    }
    MXD_CHECK(std::isfinite(l), "the loss became ", l, " (no weight was updated)");
    layer.backward(x, dy, target);
    if (comm) bytes_sent += double(comm->bytes_sent - sent);
    return l;
  }
  // --aux-k: adds the AuxK gradient (dead units as of the previous step) to this step's, then
  // records this step's selection. Between backward and the optimizer step.
  void aux_step(const Tensor<T>& x, const Tensor<T>& target) {
    if (!aux.enabled()) return;
    train::auxk_backward(p, x.view(), pred.view(), target.view(), ws, dead, aux, aux_ws, g);
    dead.record(ws.topk_idx.view(), ws.topk_val.view());
  }
  void enable_aux(const train::AuxK& a, index_t units) {
    aux = a;
    dead = train::DeadUnits(units, a.dead_window);
  }
  // The AdamW update; under --parallel its error (a non-finite gradient in one rank's
  // experts) stops every rank.
  void step() {
    if (comm) comm->together([&] { opt.step(p, g, ws.ctx); });
    else opt.step(p, g, ws.ctx);
  }
  // Bytes of the parameters, gradients and AdamW moments on this rank.
  double state_bytes() const {
    double b = 0;
    for (const Set<T, cpu>* s : {&p, &g, &opt.m, &opt.v})
      s->for_each([&](const char*, const Tensor<T>& t) { b += double(t.bytes()); });
    return b;
  }
  template <class Layer>
  void predict(Layer& layer, const Tensor<T>& x, Tensor<T>& y) {
    if (gpu) gpu->predict(x, y, gpu_idx, gpu_val);
    else layer.forward(x, y);
  }
  const Tensor<std::int32_t>& idx() const { return gpu ? gpu_idx : ws.topk_idx; }
  const Tensor<T>& val() const { return gpu ? gpu_val : ws.topk_val; }
  void save(const std::string& path) {
    if (gpu) gpu->download(p, opt);
    io::save_checkpoint(path, p, &opt);
    if (aux.enabled()) train::save_dead_units(dead_file(path), dead);
  }
  // --aux-k on a resumed model: its dead-unit state from beside `path`, when it was saved.
  void resume_aux(const std::string& path) {
    if (!aux.enabled()) return;
    if (std::filesystem::exists(dead_file(path))) train::load_dead_units(dead_file(path), dead);
    else
      std::fprintf(stderr, "mxd: note: %s has no dead-unit state beside it; the dead window "
                           "restarts\n", path.c_str());
  }
};

template <class T>
struct MxdModel : Model<T, Params, Workspace<T>> {
  static constexpr const char* name = "mxd";
  using Model<T, Params, Workspace<T>>::Model;
  std::unique_ptr<parallel::ExpertParallel<T>> ep;   // --parallel experts
  Params<T> full;                                // rank 0: the gathered set, to save
  std::unique_ptr<AdamW<T>> full_opt;
  bool collective_forward() const { return ep != nullptr; }

  // --parallel experts: keeps this rank's shard of the experts (weights and moments).
  void shard_experts() {
    auto& m = *this;
    ep = std::make_unique<parallel::ExpertParallel<T>>(*m.comm, m.p.config);
    const index_t first = ep->first_expert(), n = ep->shards()[m.comm->rank()];
    Params<T> local = parallel::shard_params(m.p, first, n);
    AdamW<T> lopt(local, m.opt.config());
    lopt.m = parallel::shard_params(m.opt.m, first, n);
    lopt.v = parallel::shard_params(m.opt.v, first, n);
    lopt.t = m.opt.t;
    m.p = std::move(local);
    m.opt = std::move(lopt);
    m.g = Grads<T>(m.p.config);
  }
  // Collective before save(): with sharded experts, rank 0 gathers the whole set.
  void gather_for_save() {
    if (!ep) return;
    auto& m = *this;
    const bool root = m.comm->rank() == 0;
    if (root && full.config.n_experts == 0) {
      full = Params<T>(ep->full_config());
      full_opt = std::make_unique<AdamW<T>>(full, m.opt.config());
    }
    Params<T> none;
    parallel::gather_experts(*m.comm, m.p, root ? full : none, ep->shards());
    parallel::gather_experts(*m.comm, m.opt.m, root ? full_opt->m : none, ep->shards());
    parallel::gather_experts(*m.comm, m.opt.v, root ? full_opt->v : none, ep->shards());
    if (root) full_opt->t = m.opt.t;
  }
  void save(const std::string& path) {
    if (ep) io::save_checkpoint(path, full, full_opt.get());
    else Model<T, Params, Workspace<T>>::save(path);
  }
  double memory_bytes() const {
    return this->state_bytes() + double(this->ws.bytes()) + (ep ? double(ep->bytes()) : 0.0);
  }
  // The whole layer's figures (a rank holds a shard of the experts under --parallel experts).
  const Config& layer() const { return ep ? ep->full_config() : this->p.config; }
  index_t k() const { return layer().k; }
  index_t units() const { return layer().n_experts; }
  index_t n_params() const { return layer().n_params(); }
  double train_step(const Tensor<T>& x, const Tensor<T>& target) {
    return Model<T, Params, Workspace<T>>::train_step(*this, x, target);
  }
  void predict(const Tensor<T>& x, Tensor<T>& y) { Model<T, Params, Workspace<T>>::predict(*this, x, y); }
  // The host layer (used when gpu is not set).
  void forward(const Tensor<T>& x, Tensor<T>& y) {
    if (ep) ep->forward(this->p, x.view(), y.view(), this->ws, this->rows);
    else mxd::forward(this->p, x.view(), y.view(), this->ws);
  }
  void backward(const Tensor<T>& x, const Tensor<T>& dy, const Tensor<T>& target) {
    auto& m = *this;
    if (ep) ep->backward(m.p, x.view(), dy.view(), m.ws, m.g);
    else mxd::backward(m.p, x.view(), dy.view(), m.ws, m.g);
    m.aux_step(x, target);
    if (ep) m.reduce(*m.comm, m.g, parallel::dense_only);  // expert gradients are complete per shard
    else if (m.comm) m.reduce(*m.comm, m.g);
    if (m.norm_dec) project_expert_grads(m.p, m.g, m.ws.ctx);
    m.step();
    if (m.norm_dec) normalize_experts(m.p, m.ws.ctx);
  }
};

template <class T>
struct TranscoderModel : Model<T, TranscoderParams, TranscoderWorkspace<T>> {
  using Base = Model<T, TranscoderParams, TranscoderWorkspace<T>>;
  std::string name;
  TranscoderModel(TranscoderParams<T> params, const AdamWConfig& oc, bool nd, int threads)
      : Base(std::move(params), oc, nd, threads),
        name(this->p.config.skip ? "skip_transcoder" : "topk_transcoder") {
    this->norm_dec = nd && !this->p.config.skip;  // skip transcoders keep free decoder rows
  }
  index_t k() const { return this->p.config.k; }
  index_t units() const { return this->p.config.n_latents; }
  index_t n_params() const { return this->p.config.n_params(); }
  double train_step(const Tensor<T>& x, const Tensor<T>& target) {
    return Base::train_step(*this, x, target);
  }
  void predict(const Tensor<T>& x, Tensor<T>& y) { Base::predict(*this, x, y); }
  bool collective_forward() const { return false; }
  void gather_for_save() {}
  double memory_bytes() const {
    double b = this->state_bytes();
    const auto& w = this->ws;
    for (const auto* t : {&w.scores, &w.topk_val, &w.ones, &w.v, &w.ds}) b += double(t->bytes());
    for (const auto* t : {&w.topk_idx, &w.order, &w.offsets}) b += double(t->bytes());
    return b;
  }
  void forward(const Tensor<T>& x, Tensor<T>& y) {
    transcoder_forward(this->p, x.view(), y.view(), this->ws);
  }
  void backward(const Tensor<T>& x, const Tensor<T>& dy, const Tensor<T>& target) {
    auto& m = *this;
    transcoder_backward(m.p, x.view(), dy.view(), m.ws, m.g);
    m.aux_step(x, target);
    if (m.comm) m.reduce(*m.comm, m.g);  // the baseline is data-parallel in both modes
    if (m.norm_dec) backend<cpu>::remove_parallel_rows(m.ws.ctx, m.p.W_dec.view(), m.g.W_dec.view());
    m.step();
    if (m.norm_dec) backend<cpu>::normalize_rows(m.ws.ctx, m.p.W_dec.view());
  }
};

// Under --parallel every rank predicts its rows of each held-out batch and rank 0 gathers
// the outputs and selections: its result is the single process's (the other ranks' is not
// used).
template <class T, class Model>
Eval evaluate(Model& m, train::DataSource<T>& src, index_t batch, Dist* d = nullptr) {
  Accumulator<T> acc(src.d_out(), m.units());
  Tensor<T> x, t, y, xr, y_all, v_all;
  Tensor<std::int32_t> i_all;
  const bool spread = d && d->comm && !m.gpu;
  for (index_t first = 0; first < src.eval_rows(); first += batch) {
    const index_t n = std::min(batch, src.eval_rows() - first);
    src.eval_batch(first, n, x, t);
    if (!spread) {
      y.resize(n, src.d_out(), false);
      m.predict(x, y);
      acc.add(y, t, m.idx(), m.val());
      continue;
    }
    m.rows = parallel::split(n, d->size(), parallel::row_align);
    const index_t r0 = parallel::offsets(m.rows)[d->rank()], Br = m.rows[d->rank()], k = m.k();
    xr.resize(Br, x.cols(), false);
    std::copy(x.data() + r0 * x.cols(), x.data() + (r0 + Br) * x.cols(), xr.data());
    y.resize(Br, src.d_out(), false);
    if (Br > 0 || m.collective_forward()) m.predict(xr, y);
    const index_t all = d->root() ? n : 0;
    y_all.resize(all, src.d_out(), false);
    i_all.resize(all, k, false);
    v_all.resize(all, k, false);
    d->comm->gather<T>(y.view(), y_all.view(), m.rows);
    d->comm->gather<std::int32_t>(ConstView<std::int32_t>(m.idx().data(), Br, k), i_all.view(), m.rows);
    d->comm->gather<T>(ConstView<T>(m.val().data(), Br, k), v_all.view(), m.rows);
    if (d->root()) acc.add(y_all, t, i_all, v_all);
  }
  return acc.result();
}

struct Row {
  std::string name;
  index_t params, k;
  Eval eval;
  double tokens_per_s;
  // --parallel, per rank: bytes sent per step, the model's memory after its last step
  // (parameters, gradients, AdamW moments, workspace) and the process's peak resident memory.
  std::vector<double> rank_bytes_per_step, rank_memory, rank_peak_rss;
  double train_dead = -1;  // --aux-k: fraction of units dead in training at the end
};

// Collective: every rank's bytes per step and memory of model m, on every rank.
template <class Model>
void add_rank_figures(Row& row, Model& m, Dist* d, index_t steps_run) {
  if (!d || !d->comm) return;
  Tensor<double> mine(1, 3), all(d->size(), 3);
  mine[0] = steps_run > 0 ? m.bytes_sent / double(steps_run) : 0.0;
  mine[1] = m.trained_memory;
  mine[2] = peak_rss_bytes();
  d->comm->all_gather<double>(mine.view(), all.view(), std::vector<index_t>(d->size(), 1));
  for (int q = 0; q < d->size(); ++q) {
    row.rank_bytes_per_step.push_back(all(q, 0));
    row.rank_memory.push_back(all(q, 1));
    row.rank_peak_rss.push_back(all(q, 2));
  }
}

template <class T>
std::unique_ptr<train::DataSource<T>> make_source(const Options& o) {
  if (!o.data.empty())
    return std::make_unique<train::ActivationFiles<T>>(o.data, o.eval_fraction, o.seed);
  return std::make_unique<train::Teacher<T>>(o.layer.d_in, o.teacher_hidden, o.layer.d_out,
                                             o.seed, o.eval_rows);
}

// The MxD and baseline files to resume from (baseline "" when there is none). From a
// directory, or a file in one, that holds a checkpoint manifest: the pair it names, which is
// always complete and at one step. A lone file (no manifest): it and the baseline beside it.
std::pair<std::string, std::string> resume_files(const std::string& resume,
                                                 const std::string& tc_file) {
  namespace fs = std::filesystem;
  const bool is_dir = fs::is_directory(resume);
  const std::string dir = is_dir ? resume : io::parent_dir(resume);
  const io::CheckpointDir::Set set = io::CheckpointDir(dir).latest();
  if (set.step >= 0) {
    const std::string m = set.file("mxd.safetensors");
    MXD_CHECK(!m.empty(), io::CheckpointDir(dir).manifest(), " names no mxd.safetensors");
    return {m, set.file(tc_file)};
  }
  MXD_CHECK(!is_dir, "--resume ", resume, ": the directory has no checkpoint.json");
  const std::string b = (fs::path(dir) / tc_file).string();
  return {resume, fs::exists(b) ? b : ""};
}

// The exclusive lock on --out for the whole run: flock(2) on DIR/.lock, which names the
// holder. Two runs writing one folder would remove each other's checkpoint sets; the kernel
// drops the lock when the process ends, however it ends, so a killed run never blocks the next.
class OutLock {
public:
  explicit OutLock(const std::string& out) {
    const std::string path = (std::filesystem::path(out) / ".lock").string();
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    MXD_CHECK(fd_ >= 0, "--out = '", out, "' is not writable: cannot create ", path, ": ",
              std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      char buf[256] = {};
      const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
      std::string holder(buf, n > 0 ? std::size_t(n) : 0);
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
      ::close(fd_);
      fd_ = -1;
      MXD_CHECK(err != EWOULDBLOCK, "--out = '", out, "' is in use by another mxd train (",
                holder.empty() ? std::string("holder unknown") : detail::printable(holder),
                ", holding ", path, "): give another --out");
      throw io::IoError::failed("cannot lock " + path, err);
    }
    char host[256] = {};
    if (::gethostname(host, sizeof host - 1) != 0) std::snprintf(host, sizeof host, "unknown");
    const std::string who = detail::concat("pid ", ::getpid(), " on host ", host, "\n");
    const bool named = ::ftruncate(fd_, 0) == 0 && ::pwrite(fd_, who.data(), who.size(), 0) > 0;
    (void)named;  // best effort: the lock does not depend on it, only a refused run's message
  }
  OutLock(const OutLock&) = delete;
  OutLock& operator=(const OutLock&) = delete;
  ~OutLock() {
    if (fd_ >= 0) ::close(fd_);
  }

private:
  int fd_ = -1;
};

// An earlier run's checkpoint manifests in `out` (checkpoint.json, checkpoint_kK.json for a k
// sweep); one that is not a regular file is an error.
std::vector<std::string> earlier_manifests(const std::string& out) {
  namespace fs = std::filesystem;
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(out, ec)) {
    const std::string n = e.path().filename().string();
    const bool manifest =
        n == "checkpoint.json" ||
        (n.rfind("checkpoint_k", 0) == 0 && n.size() > 17 && n.compare(n.size() - 5, 5, ".json") == 0 &&
         n.substr(12, n.size() - 17).find_first_not_of("0123456789") == std::string::npos);
    if (manifest && io::regular_file_exists(e.path().string())) found.push_back(e.path().string());
  }
  MXD_CHECK(!ec, "--out = '", out, "': cannot list the directory: ", ec.message());
  return found;
}

// Creates --out and locks it, before any training. A fresh run (no --resume) into a folder
// that holds an earlier run's checkpoints would replace them: refused unless --overwrite.
std::unique_ptr<OutLock> prepare_out_dir(const Options& o) {
  namespace fs = std::filesystem;
  const std::string& out = o.out;
  std::error_code ec;
  fs::create_directories(out, ec);
  MXD_CHECK(!ec, "--out = '", out, "': cannot create the directory: ", ec.message());
  MXD_CHECK(fs::is_directory(out), "--out = '", out, "' is not a directory");
  auto lock = std::make_unique<OutLock>(out);
  const std::vector<std::string> earlier = earlier_manifests(out);
  MXD_CHECK(earlier.empty() || !o.resume.empty() || o.overwrite, "--out = '", out,
            "' holds an earlier run's checkpoints (", earlier.front(), "): give --resume ", out,
            " to continue it, --overwrite to replace it, or another --out");
  return lock;
}

// One log.csv row: the step, then each model's mean loss over the steps since the last row.
std::string csv_row(index_t step, const std::vector<double>& values) {
  std::string row = std::to_string(static_cast<long long>(step));
  char buf[64];
  for (double v : values) {
    std::snprintf(buf, sizeof buf, ",%.8g", v);
    row += buf;
  }
  return row + "\n";
}

// log.csv as training goes: each row appended and flushed at once (a killed run keeps its
// rows), synced with each checkpoint. A resumed run continues the log beside its checkpoint:
// its rows up to the resumed step, then the new ones, so the file and the curves drawn from
// it cover the whole training. Inactive (every call a no-op) until open().
class TrainLog {
public:
  // Starts `path` with the header "step,NAME..."; when resuming from step `start`, with the
  // rows of `previous` up to it first, whose losses are also appended to `curves` (one per
  // name).
  void open(const std::string& path, const std::vector<std::string>& names, index_t start,
            const std::string& previous, const std::vector<Series*>& curves) {
    std::string header = "step";
    for (const auto& n : names) header += "," + n;
    header += "\n";
    std::string text = header;
    if (start > 0) text += previous_rows(previous, header, start, curves);
    io::write_file_durable(path, text);
    file_ = io::AppendFile(path);
  }
  void add(index_t step, const std::vector<double>& values) {
    if (file_.is_open()) file_.append(csv_row(step, values));
  }
  void sync() {
    if (file_.is_open()) file_.sync();
  }
  void close() {
    if (file_.is_open()) file_.close();
  }

private:
  static std::string previous_rows(const std::string& previous, const std::string& header,
                                   index_t start, const std::vector<Series*>& curves) {
    if (!io::regular_file_exists(previous)) return "";
    std::ifstream in(previous, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), {});
    if (text.compare(0, header.size(), header) != 0) {
      std::fprintf(stderr, "mxd: note: %s is not this model's log (another header); log.csv "
                           "starts at step %lld\n", previous.c_str(), static_cast<long long>(start));
      return "";
    }
    std::string kept;
    std::size_t at = header.size();
    for (std::size_t end; (end = text.find('\n', at)) != std::string::npos; at = end + 1) {
      const std::string line = text.substr(at, end - at);
      char* p = nullptr;
      const long long step = std::strtoll(line.c_str(), &p, 10);
      std::vector<double> v;
      while (*p == ',') v.push_back(std::strtod(p + 1, &p));
      // A row cut short (a crash while it was written) or past the resumed step ends the log.
      if (*p != '\0' || p == line.c_str() || v.size() != curves.size() || step > start) break;
      kept += line + "\n";
      for (std::size_t c = 0; c < curves.size(); ++c) {
        curves[c]->x.push_back(double(step));
        curves[c]->y.push_back(v[c]);
      }
    }
    return kept;
  }

  io::AppendFile file_;
};

// --resume refuses a layer flag whose value differs from the checkpoint's: the run continues
// the saved model, so the flag would be ignored while the report showed it.
void check_resume_flags(const Options& o, index_t k, const Config& c, const TranscoderConfig* t) {
  auto same = [&](const char* flag, const std::string& given, const std::string& saved) {
    MXD_CHECK(!o.layer_given.count(flag) || given == saved, "--", flag, " ", given,
              " conflicts with the checkpoint resumed (", o.resume, "), whose ", flag, " is ",
              saved, ": --resume continues the saved model, so drop --", flag);
  };
  const auto str = [](index_t v) { return std::to_string(static_cast<long long>(v)); };
  same("d-in", str(o.layer.d_in), str(c.d_in));
  same("d-hidden", str(o.layer.d_hidden), str(c.d_hidden));
  same("d-out", str(o.layer.d_out), str(c.d_out));
  same("experts", str(o.layer.n_experts), str(c.n_experts));
  same("k", str(k), str(c.k));
  same("activation", activation_name(o.layer.activation), activation_name(c.activation));
  same("glu", o.layer.glu ? "on" : "off", c.glu ? "on" : "off");
  same("skip", o.layer.skip ? "on" : "off", c.skip ? "on" : "off");
  if (t)
    same("expansion", str(o.expansion),
         t->n_latents % t->d_in == 0 ? str(t->n_latents / t->d_in)
                                     : str(t->n_latents) + " / " + str(t->d_in));
}

// Trains both models at one k; returns their rows and appends their loss curves.
template <class T>
std::vector<Row> train_at(const Options& o, index_t k, train::DataSource<T>& src, bool sweep,
                          std::vector<Series>& curves, std::vector<std::vector<double>>& log_cols,
                          std::vector<std::string>& log_names) {
  AdamWConfig oc;
  oc.lr = o.lr;
  oc.warmup_steps = o.warmup;
  Config cfg = o.layer;
  cfg.k = k;
  index_t start = 0;
  std::unique_ptr<MxdModel<T>> mxd;
  std::unique_ptr<TranscoderModel<T>> tc;
  const std::string suffix = sweep ? "_k" + std::to_string(k) : "";
  const bool skip_tc = o.baseline == "skip";
  TranscoderConfig tcc{cfg.d_in, cfg.d_out, o.expansion * cfg.d_in, k, skip_tc};

  const std::string tc_file = std::string(skip_tc ? "skip" : "topk") + "_transcoder.safetensors";
  io::CheckpointDir ckpt_dir(o.out, suffix);
  Dist* const d = o.dist;
  const bool par = d && d->comm;
  // Every rank builds the models the same way (and reads --resume itself); an error on any
  // rank stops all of them.
  auto build = [&] {
  if (!o.resume.empty()) {
    const auto [mpath, bpath] = resume_files(o.resume, tc_file);
    io::SafetensorsReader f(mpath);
    const Config rc = io::read_config(f);
    mxd = std::make_unique<MxdModel<T>>(io::load_params<T>(f, rc), oc, o.norm_dec, o.threads);
    io::load_optimizer(f, mxd->opt);
    start = mxd->opt.t;
    if (o.baseline != "none") {
      MXD_CHECK(!bpath.empty(), o.resume, ": the checkpoint has no ", tc_file,
                " (use the --baseline it was trained with)");
      io::SafetensorsReader b(bpath);
      tc = std::make_unique<TranscoderModel<T>>(io::load_transcoder<T>(b, io::read_transcoder_config(b)),
                                                oc, o.norm_dec, o.threads);
      io::load_optimizer(b, tc->opt);
      MXD_CHECK(tc->opt.t == start, bpath, " is at step ", tc->opt.t, " but ", mpath, " at ", start);
    }
    check_resume_flags(o, k, rc, tc ? &tc->p.config : nullptr);
    MXD_CHECK(mxd->p.config.d_in == src.d_in() && mxd->p.config.d_out == src.d_out(), o.resume,
              " expects d_in = ", mxd->p.config.d_in, ", d_out = ", mxd->p.config.d_out,
              " but the data has ", src.d_in(), ", ", src.d_out());
  } else {
    Params<T> p(cfg);
    init_params(p, o.seed, o.norm_dec);
    mxd = std::make_unique<MxdModel<T>>(std::move(p), oc, o.norm_dec, o.threads);
    if (o.baseline != "none") {
      TranscoderParams<T> tp(tcc);
      init_transcoder(tp, o.seed + 1);
      tc = std::make_unique<TranscoderModel<T>>(std::move(tp), oc, o.norm_dec, o.threads);
    }
  }
  if (o.aux.enabled()) {
    mxd->enable_aux(o.aux, mxd->units());
    if (tc) tc->enable_aux(o.aux, tc->units());
    if (!o.resume.empty()) {
      const auto files = resume_files(o.resume, tc_file);
      mxd->resume_aux(files.first);
      if (tc) tc->resume_aux(files.second);
    }
  }
  if (par) {
    mxd->comm = d->comm.get();
    if (tc) tc->comm = d->comm.get();
    if (d->mode == Parallel::experts) mxd->shard_experts();
  }
  };
  if (par) together(*d, build);
  else build();
  // This rank's rows of every batch.
  std::vector<index_t> batch_rows{o.batch};
  if (par) together(*d, [&] { batch_rows = parallel::batch_rows(o.batch, d->size()); });
  const index_t row0 = par ? parallel::offsets(batch_rows)[d->rank()] : 0;
  const index_t my_rows = batch_rows[par ? d->rank() : 0];
  mxd->rows = batch_rows;
  if (tc) tc->rows = batch_rows;
  // start == steps: a run killed after its last checkpoint; it only evaluates and reports.
  MXD_CHECK(start <= o.steps, "--steps = ", o.steps, " but the checkpoint is already at step ", start);

  if (o.cuda) {
    mxd->to_gpu(o.math);
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
    std::vector<std::string> names{"mxd"};
    std::vector<Series*> logged{&c_mxd};
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
    mxd->gather_for_save();
    auto write = [&] {
      if (par && !d->root()) return;
      ckpt_dir.commit(steps_done, [&](const std::string& folder) {
        mxd->save(folder + "/mxd.safetensors");
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
        mxd->rows = batch_rows;
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
      l_mxd = mxd->train_step(x, y);
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
    // The GPU path reports its loss only after the update: checked here.
    if (!std::isfinite(l_mxd) || !std::isfinite(l_tc))
      throw stopped(step, detail::concat("the loss became ", std::isfinite(l_mxd) ? l_tc : l_mxd),
                    lr_hint);
    // Rows at multiples of --log-every, whatever step a run resumed at: a resumed log has the
    // rows of an uninterrupted one.
    ++in_window;
    if ((step + 1) % o.log_every == 0 || step + 1 == o.steps) {
      col_step.push_back(double(step + 1));
      col_mxd.push_back(sum_mxd / double(in_window));
      c_mxd.x.push_back(double(step + 1));
      c_mxd.y.push_back(sum_mxd / double(in_window));
      if (tc) {
        col_tc.push_back(sum_tc / double(in_window));
        c_tc.x.push_back(double(step + 1));
        c_tc.y.push_back(sum_tc / double(in_window));
      }
      try {
        log.add(step + 1, tc ? std::vector<double>{col_mxd.back(), col_tc.back()}
                             : std::vector<double>{col_mxd.back()});
      } catch (const Error& e) {
        throw stopped(step, e.what(), "");
      }
      sum_mxd = sum_tc = 0;
      in_window = 0;
    }
    std::vector<ModelProgress> now{{"mxd", l_mxd, time_mxd}};
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
  mxd->trained_memory = mxd->memory_bytes();
  if (tc) tc->trained_memory = tc->memory_bytes();
  const double tokens = double(o.steps - start) * double(B);
  auto rate = [&](double seconds) { return seconds > 0 ? tokens / seconds : 0.0; };
  std::vector<Row> rows;
  rows.push_back({"mxd", mxd->n_params(), mxd->k(), evaluate(*mxd, src, B, d), rate(time_mxd), {}, {}, {}});
  add_rank_figures(rows.back(), *mxd, d, o.steps - start);
  auto train_dead = [](const auto& m) { return double(m.dead.count()) / double(m.units()); };
  if (o.aux.enabled()) rows.front().train_dead = train_dead(*mxd);
  if (log_cols.empty()) log_cols.push_back(col_step);
  log_cols.push_back(col_mxd);
  log_names.push_back("mxd" + suffix);
  curves.push_back(c_mxd);
  if (tc) {
    rows.push_back({tc->name, tc->n_params(), tc->k(), evaluate(*tc, src, B, d), rate(time_tc), {}, {}, {}});
    add_rank_figures(rows.back(), *tc, d, o.steps - start);
    if (o.aux.enabled()) rows.back().train_dead = train_dead(*tc);
    log_cols.push_back(col_tc);
    log_names.push_back(tc->name + suffix);
    curves.push_back(c_tc);
  }
  return rows;
}

std::vector<index_t> parse_ks(const std::string& s) {
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

// A k sweep's log.csv: the step column, then one per model and k (NaN where a model has no row).
void write_sweep_log(const std::string& path, const std::vector<std::string>& names,
                     const std::vector<std::vector<double>>& cols) {
  std::string csv = "step";
  for (const auto& n : names) csv += "," + n;
  csv += "\n";
  for (std::size_t i = 0; !cols.empty() && i < cols[0].size(); ++i) {
    std::vector<double> values;
    for (std::size_t c = 1; c < cols.size(); ++c) values.push_back(i < cols[c].size() ? cols[c][i] : NAN);
    csv += csv_row(static_cast<index_t>(cols[0][i]), values);
  }
  io::write_file_durable(path, csv);
}

// Refuses sizes that this machine cannot hold, before anything is allocated (memory.hpp).
// Counted per rank: both models' parameters, gradients and AdamW moments, their workspaces
// for the rank's rows of a batch, the batch and the teacher's held-out rows; under
// --parallel experts only the rank's share of the experts, but rank 0 also gathers the whole
// set to save it. The ranks that share the machine are counted together.
template <class T>
void check_train_memory(const Options& o) {
  Config c = o.layer;
  c.k = *std::max_element(o.ks.begin(), o.ks.end());
  TranscoderConfig tcc{c.d_in, c.d_out, o.expansion * c.d_in, c.k, o.baseline == "skip"};
  if (!o.resume.empty()) {  // the checkpoint's sizes, whatever the flags say
    const auto files = resume_files(o.resume, std::string(tcc.skip ? "skip" : "topk") +
                                                  "_transcoder.safetensors");
    io::SafetensorsReader f(files.first);
    c = io::read_config(f);
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
  double rank = 4 * s * (dense + (experts ? std::ceil(expert_params / P) : expert_params)) +
                workspace_bytes<T>(c, rows) + 2 * s * double(o.batch) * double(c.d_in + c.d_out);
  if (o.baseline != "none")
    rank += 4 * s * double(tcc.n_params()) + s * rows * double(tcc.n_latents + 2 * c.d_out);
  if (o.data.empty()) rank += s * double(o.eval_rows) * double(c.d_in + c.d_out);
  const double gather = experts && d->root() ? 3 * s * double(c.n_params()) : 0;
  const int here = P > 1 ? ranks_on_this_machine() : 1;
  check_memory(here * rank + gather,
               "parameters, gradients, AdamW moments and workspaces of both models, and the data" +
                   (here > 1 ? ", for the " + std::to_string(here) + " ranks on this machine" : std::string()));
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
    if (o.aux.enabled())
      models.back().update({{"aux_k", o.aux.k}, {"aux_coef", o.aux.coef},
                            {"dead_window", o.aux.dead_window},
                            {"train_dead_fraction", r.train_dead}});
  }
  if (o.aux.enabled())
    std::printf("AuxK loss on: k_aux %lld, coef %g, dead window %lld tokens\n", (long long)o.aux.k,
                o.aux.coef, (long long)o.aux.dead_window);
  namespace fs = std::filesystem;
  const fs::path out(o.out);
  nlohmann::json metrics{{"models", models}};
  if (par)
    metrics["parallel"] = {{"mode", d->mode == Parallel::data ? "data" : "experts"},
                           {"processes", d->size()}, {"ranks", ranks}};
  io::write_file_durable((out / "metrics.json").string(), metrics.dump(2) + "\n");
  Axes loss_axes;
  loss_axes.title = sweep ? "training loss (reference normalized MSE); dashed: the baseline at the same k"
                          : "training loss (reference normalized MSE)";
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
  return 0;
}


// The command line but --threads (which does not change results): what ranks must share.
std::string command_line(int argc, char** argv) {
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

int train_command(int argc, char** argv, Dist& dist) {
  if (dist.comm) {
    dist.comm->check_same("the command line of mxd train (all but --threads)", command_line(argc, argv));
    dist.same_everywhere = true;  // until the data is opened, every rank fails alike
  }
  std::set<std::string> flags = layer_flags();
  for (const char* f : {"data", "teacher-hidden", "eval-rows", "eval-fraction", "expansion",
                        "baseline", "batch", "steps", "lr", "warmup", "seed", "threads", "dtype",
                        "device", "log-every", "progress-every", "checkpoint-every", "out", "resume",
                        "aux-k", "aux-coef", "dead-window",
                        "parallel", "timeout"})
    flags.insert(f);
  std::set<std::string> switches = layer_switches();
  switches.insert({"no-norm-dec", "tf32", "overwrite"});
  Args args(argc, argv, argc < 2 ? argc : 2, flags, switches);
  if (args.help()) {
    std::printf(train_help, layer_flags_help(/*with_k=*/false).c_str());
    return 0;
  }
  MXD_CHECK(args.positional().empty(), "mxd train takes no positional argument, got '",
            args.positional().front(), "'");
  Options o;
  o.expansion = args.get_int("expansion", 32, 1, max_width);
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
  if (!args.has("experts"))
    defaults.n_experts = matched_experts(sized.d_in, sized.d_hidden, sized.d_out, o.expansion,
                                         args.flag("glu"), args.flag("skip"));
  defaults.k = *std::min_element(o.ks.begin(), o.ks.end());
  o.layer = layer_config(args, defaults, /*read_k=*/false);
  for (index_t k : o.ks) {
    MXD_CHECK(k <= o.layer.n_experts, "--k = ", k, " exceeds the ", o.layer.n_experts, " experts");
    MXD_CHECK(k <= o.expansion * o.layer.d_in, "--k = ", k, " exceeds the transcoder's ",
              o.expansion * o.layer.d_in, " latents");
  }
  o.baseline = args.get("baseline", "topk");
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
  for (const char* f : {"d-in", "d-hidden", "d-out", "experts", "k", "activation", "glu", "skip", "expansion"})
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
  const std::string dtype = args.get("dtype", "f32");
  MXD_CHECK(!args.flag("tf32") || (o.cuda && dtype == "f32"), "--tf32 needs --device cuda --dtype f32");
  MXD_CHECK(dtype != "bf16" || o.cuda, "--dtype bf16 needs --device cuda");
  o.math = dtype == "bf16" ? "bf16" : args.flag("tf32") ? "tf32" : "fp32";
  o.aux.k = args.get_int("aux-k", 0);
  o.aux.coef = args.get_double("aux-coef", o.aux.coef);
  o.aux.dead_window = args.get_int("dead-window", o.aux.dead_window);
  MXD_CHECK(o.aux.k >= 0, "--aux-k = ", o.aux.k, " must be >= 0 (0: off)");
  MXD_CHECK(o.aux.coef > 0, "--aux-coef = ", o.aux.coef, " must be positive");
  MXD_CHECK(o.aux.dead_window > 0, "--dead-window = ", o.aux.dead_window, " must be positive");
  MXD_CHECK(o.aux.enabled() || (!args.has("aux-coef") && !args.has("dead-window")),
            "--aux-coef and --dead-window need --aux-k K > 0 (the AuxK loss is off without it)");
  MXD_CHECK(!o.aux.enabled() || !o.cuda, "--aux-k is not supported with --device cuda yet");
  if (o.cuda) require_cuda();
  MXD_CHECK(!(dist.comm && o.cuda), "--parallel runs on the CPU (--device cuda is one process)");
  MXD_CHECK(!(dist.comm && o.aux.enabled()),
            "--aux-k is not supported with --parallel yet (each rank would count dead units alone)");
  if (dist.comm) o.dist = &dist;
  const double timeout = args.get_double("timeout", default_timeout);
  MXD_CHECK(timeout >= 0, "--timeout = ", timeout, " must be >= 0 (0: wait forever)");
  if (dist.comm) dist.comm->timeout = timeout;
  std::unique_ptr<OutLock> out_lock;  // held until the run returns
  together(dist, [&] {
    if (dist.root()) out_lock = prepare_out_dir(o);
  });
  dist.same_everywhere = false;
  if (dtype == "bf16") return run<float>(o);
  if (dtype == "f32") return run<float>(o);
  if (dtype == "f64") return run<double>(o);
  throw Error("--dtype = '" + dtype + "' is not f32, f64 or bf16");
}

}  // namespace

int run_train(int argc, char** argv) {
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
