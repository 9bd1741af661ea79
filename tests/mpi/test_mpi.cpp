// SPDX-License-Identifier: MIT
// Data- and expert-parallel training under mpirun against the single-process run, which every
// rank also computes itself on the whole batch: identical top-k, outputs, gradients and
// weights within 1e-10 (double) / 1e-4 (float) relative after 1 and 10 steps; two runs with
// the same P give identical bits; replicated weights are bit-identical on every rank.
// Run as `mpirun -np P mxd_mpi_tests` (ctest: P = 1, 2, 3).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

#include <mxd/parallel/data_parallel.hpp>
#include <mxd/parallel/expert_parallel.hpp>
#include <mxd/parallel/step.hpp>
#include <mxd/parallel/mpi.hpp>
#include <mxd/train/data.hpp>

#include "../testing.hpp"

namespace {

mxd::parallel::Communicator* world = nullptr;

using mxd::index_t;
using mxd::Tensor;

enum class Mode { data, experts };

// I = O = 16 (so skip is possible), H = 32, N = 700 experts (divides by neither 2 nor 3;
// shards 512 + 188 and 256 + 256 + 188), k = 8, B = 384 rows (P = 2: 256 + 128; P = 3: 128
// each).
mxd::Config small_config(bool variant) {
  mxd::Config c;
  c.d_in = 16;
  c.d_hidden = 32;
  c.d_out = 16;
  c.n_experts = 700;
  c.k = 8;
  c.activation = variant ? mxd::Activation::gelu : mxd::Activation::relu;
  c.glu = variant;
  c.skip = variant;
  return c;
}
constexpr index_t batch = 384;

template <class T>
Tensor<T> rows_of(const Tensor<T>& t, index_t first, index_t n) {
  Tensor<T> out(n, t.cols());
  std::copy(t.data() + first * t.cols(), t.data() + (first + n) * t.cols(), out.data());
  return out;
}

// What a run leaves to compare: per step the rank's rows' selection and outputs; after the
// first step the gradients (the rank's view: full for data, shard + dense for experts) and
// dx; at the end the weights.
template <class T>
struct Run {
  std::vector<Tensor<std::int32_t>> idx;
  std::vector<Tensor<T>> val, y;
  mxd::Params<T> grads_step1, weights;
  Tensor<T> dx_step1;
  std::vector<double> loss;
};

// The single-process run on the whole batch (rows: all of them).
template <class T>
Run<T> train_single(const mxd::Config& c, int steps, std::uint64_t seed) {
  mxd::Params<T> p = mxd_test::random_params<T>(c, seed);
  mxd::train::Teacher<T> data(c.d_in, 24, c.d_out, seed, 0);
  mxd::AdamWConfig oc;
  oc.lr = 1e-3;
  oc.warmup_steps = 2;
  mxd::AdamW<T> opt(p, oc);
  mxd::Grads<T> g(c);
  mxd::Workspace<T> ws;
  Run<T> run;
  Tensor<T> x, t, y(batch, c.d_out), dy(batch, c.d_out), dx(batch, c.d_in);
  for (int s = 0; s < steps; ++s) {
    data.train_batch(s, batch, x, t);
    mxd::forward(p, x.view(), y.view(), ws);
    run.loss.push_back(mxd::loss<T>(mxd::Loss::nmse_ref, y.view(), t.view(), dy.view()));
    mxd::backward(p, x.view(), dy.view(), ws, g, dx.view());
    run.idx.push_back(ws.topk_idx);
    run.val.push_back(ws.topk_val);
    run.y.push_back(y);
    if (s == 0) run.dx_step1 = dx;
    mxd::project_decoder_grads(p, g, ws.ctx);
    if (s == 0) run.grads_step1 = g;
    opt.step(p, g, ws.ctx);
    mxd::normalize_decoder(p, ws.ctx);
  }
  run.weights = p;
  return run;
}

// The same run on P ranks through train::step and the parallel Reducers (as `mxd train
// --parallel` runs it); this rank's part of it.
template <class T>
Run<T> train_parallel(Mode mode, const mxd::Config& c, int steps, std::uint64_t seed) {
  mxd::parallel::Communicator& comm = *world;
  const int r = comm.rank();
  const auto rows = mxd::parallel::batch_rows(batch, comm.size());
  const index_t r0 = mxd::parallel::offsets(rows)[r], Br = rows[r];
  mxd::Params<T> full = mxd_test::random_params<T>(c, seed);
  mxd::parallel::ExpertParallel<T> ep(comm, c);
  mxd::Params<T> p = mode == Mode::data
                         ? full
                         : mxd::parallel::shard_params(full, ep.first_expert(), ep.shards()[r]);
  mxd::train::Teacher<T> data(c.d_in, 24, c.d_out, seed, 0);
  mxd::AdamWConfig oc;
  oc.lr = 1e-3;
  oc.warmup_steps = 2;
  mxd::train::Trainer<mxd::Params<T>> m(std::move(p), oc);
  m.ws.tile_rows = 128;  // gate scores in several row tiles, against the single process's one
  std::unique_ptr<mxd::parallel::DataParallel<decltype(m)>> reducer;
  if (mode == Mode::data) reducer = std::make_unique<mxd::parallel::DataParallel<decltype(m)>>(comm, rows);
  else reducer = std::make_unique<mxd::parallel::ExpertParallelStep<T>>(comm, rows, ep);
  Run<T> run;
  Tensor<T> x, t, y(Br, c.d_out), dy(Br, c.d_out), dx(Br, c.d_in);
  for (int s = 0; s < steps; ++s) {
    data.train_batch(s, batch, x, t);
    const Tensor<T> xr = rows_of(x, r0, Br), tr = rows_of(t, r0, Br);
    if (s == 0) {  // dx of the first batch, through the layer's own calls (a step has no dx)
      mxd::Grads<T> scratch(m.p.config);
      if (mode == Mode::data) mxd::forward(m.p, xr.view(), y.view(), m.ws);
      else ep.forward(m.p, xr.view(), y.view(), m.ws, rows);
      mxd::loss<T>(mxd::Loss::nmse_ref, y.view(), tr.view(), dy.view(), batch);
      if (mode == Mode::data) mxd::backward(m.p, xr.view(), dy.view(), m.ws, scratch, dx.view());
      else ep.backward(m.p, xr.view(), dy.view(), m.ws, scratch, dx.view());
      run.dx_step1 = dx;
    }
    run.loss.push_back(mxd::train::step(m, xr.view(), tr.view(), *reducer));
    run.idx.push_back(m.ws.topk_idx);
    run.val.push_back(m.ws.topk_val);
    run.y.push_back(m.pred);
    // The gradients the update used: summed over the ranks and projected (norm_dec).
    if (s == 0) run.grads_step1 = m.g;
  }
  run.weights = m.p;
  return run;
}

// Experts [first, first + n) of tensor `name` of a full set (its per-expert tensors, when
// sharded), else all of it.
template <class T>
std::vector<T> part_of(const mxd::Params<T>& full, const std::string& name, bool sharded,
                       index_t first, index_t n) {
  std::vector<T> out;
  full.for_each_param([&](const mxd::ParamDesc& d, const Tensor<T>& t) {
    if (name != d.name) return;
    if (!sharded || mxd::parallel::dense_only(d)) {
      out.assign(t.data(), t.data() + t.size());
    } else {
      const index_t w = d.unit_size();
      out.assign(t.data() + first * w, t.data() + (first + n) * w);
    }
  });
  return out;
}

template <class T>
double worst_error(const mxd::Params<T>& mine, const mxd::Params<T>& full, bool sharded,
                   index_t first, std::string& which) {
  double worst = 0;
  mine.for_each([&](const char* name, const Tensor<T>& t) {
    const std::vector<T> ref = part_of(full, name, sharded, first, mine.config.n_experts);
    // CHECK, never REQUIRE: a rank leaving a test case early would leave the others waiting.
    CHECK(ref.size() == static_cast<std::size_t>(t.size()));
    const double e = ref.size() == static_cast<std::size_t>(t.size())
                         ? mxd_test::rel_error(t.data(), ref.data(), ref.size())
                         : 1.0;
    if (e >= worst) {
      worst = e;
      which = name;
    }
  });
  return worst;
}

template <class T>
bool same_bits(const mxd::Params<T>& a, const mxd::Params<T>& b) {
  bool same = true;
  std::vector<const Tensor<T>*> tb;
  b.for_each([&](const char*, const Tensor<T>& t) { tb.push_back(&t); });
  std::size_t i = 0;
  a.for_each([&](const char*, const Tensor<T>& t) {
    same = same && t.size() == tb[i]->size() &&
           std::memcmp(t.data(), tb[i]->data(), t.bytes()) == 0;
    ++i;
  });
  return same;
}

template <class T>
void check_against_single(Mode mode, bool variant, int steps) {
  const mxd::Config c = small_config(variant);
  const double tol = mxd_test::tolerance<T>();
  const Run<T> ref = train_single<T>(c, steps, 7);
  const Run<T> got = train_parallel<T>(mode, c, steps, 7);
  const int r = world->rank();
  const auto rows = mxd::parallel::batch_rows(batch, world->size());
  const index_t r0 = mxd::parallel::offsets(rows)[r], Br = rows[r];
  mxd::parallel::ExpertParallel<T> ep(*world, c);
  const bool sharded = mode == Mode::experts;
  const index_t first = sharded ? ep.first_expert() : 0;
  CAPTURE(world->size());
  CAPTURE(r);
  for (int s = 0; s < steps; ++s) {
    CAPTURE(s);
    const Tensor<std::int32_t> ri = rows_of(ref.idx[s], r0, Br);
    const Tensor<T> rv = rows_of(ref.val[s], r0, Br), ry = rows_of(ref.y[s], r0, Br);
    // The selection is identical. At the first step the gate values are the single process's
    // bits: backend<cpu>::gemm computes each element the same way whatever rows and columns a
    // call has (backend/gemm.hpp). After the first update the weights, and so the values,
    // differ by rounding (sums across ranks change their order).
    CHECK(std::memcmp(got.idx[s].data(), ri.data(), ri.bytes()) == 0);
    if (s == 0) CHECK(std::memcmp(got.val[s].data(), rv.data(), rv.bytes()) == 0);
    CHECK(mxd_test::rel_error(got.val[s].data(), rv.data(), rv.size()) <= tol);
    CHECK(mxd_test::rel_error(got.y[s].data(), ry.data(), ry.size()) <= tol);
    CHECK(std::abs(got.loss[s] - ref.loss[s]) <= tol * std::abs(ref.loss[s]));
  }
  std::string which;
  const double eg = worst_error(got.grads_step1, ref.grads_step1, sharded, first, which);
  INFO("worst gradient: ", which);
  CHECK(eg <= tol);
  const Tensor<T> rdx = rows_of(ref.dx_step1, r0, Br);
  CHECK(mxd_test::rel_error(got.dx_step1.data(), rdx.data(), rdx.size()) <= tol);
  const double ew = worst_error(got.weights, ref.weights, sharded, first, which);
  INFO("worst weight: ", which);
  CHECK(ew <= tol);

  // Same P, same bits; the replicated tensors are the same bits on every rank.
  const Run<T> again = train_parallel<T>(mode, c, steps, 7);
  CHECK(same_bits(got.weights, again.weights));
  bool replicated_same = true;
  got.weights.for_each_param([&](const mxd::ParamDesc& d, const Tensor<T>& t) {
    if (sharded && !mxd::parallel::dense_only(d)) return;
    Tensor<T> root = t;
    world->broadcast(root.view(), 0);
    replicated_same = replicated_same && std::memcmp(root.data(), t.data(), t.bytes()) == 0;
  });
  CHECK(replicated_same);
}

}  // namespace

TEST_CASE("split: shares cover n, start at multiples of align where n allows") {
  using mxd::parallel::split;
  CHECK(split(700, 3, 256) == std::vector<index_t>{256, 256, 188});
  CHECK(split(700, 2, 256) == std::vector<index_t>{512, 188});
  CHECK(split(384, 2, 128) == std::vector<index_t>{256, 128});
  CHECK(split(10, 3, 256) == std::vector<index_t>{4, 3, 3});      // fewer blocks than ranks
  CHECK(split(300, 2, 256) == std::vector<index_t>{256, 44});     // a short last block
  CHECK(mxd_test::error_of([] { mxd::parallel::batch_rows(2, 3); }).find("2 rows") != std::string::npos);
}

TEST_CASE("collectives: rank-order sums with the same bits on every rank; gathers in rank order") {
  mxd::parallel::Communicator& comm = *world;
  const int P = comm.size(), r = comm.rank();
  Tensor<double> v(3, 5);
  for (index_t i = 0; i < v.size(); ++i) v[i] = 0.1 * (r + 1) + 1e-17 * i + (i % 3) / 7.0;
  Tensor<double> expect(3, 5);
  for (index_t i = 0; i < v.size(); ++i) {
    double s = 0;
    for (int q = 0; q < P; ++q) s = q == 0 ? 0.1 * (q + 1) + 1e-17 * i + (i % 3) / 7.0
                                          : s + (0.1 * (q + 1) + 1e-17 * i + (i % 3) / 7.0);
    expect[i] = s;
  }
  comm.all_reduce(v.view());
  CHECK(std::memcmp(v.data(), expect.data(), v.bytes()) == 0);

  std::vector<index_t> rows(static_cast<std::size_t>(P));
  for (int q = 0; q < P; ++q) rows[q] = q + 1;  // uneven: 1, 2, 3 rows
  const index_t total = mxd::parallel::offsets(rows).back();
  Tensor<float> mine(r + 1, 2), all(total, 2);
  for (index_t i = 0; i < mine.size(); ++i) mine[i] = float(100 * r + i);
  comm.all_gather<float>(mine.view(), all.view(), rows);
  for (int q = 0; q < P; ++q)
    for (index_t i = 0; i < (q + 1) * 2; ++i)
      CHECK(all[mxd::parallel::offsets(rows)[q] * 2 + i] == float(100 * q + i));

  Tensor<float> part(total, 2), out(r + 1, 2);
  for (index_t i = 0; i < part.size(); ++i) part[i] = float(r + 1) * float(i);
  comm.reduce_scatter<float>(part.view(), out.view(), rows);
  const index_t at = mxd::parallel::offsets(rows)[r] * 2;
  for (index_t i = 0; i < out.size(); ++i) CHECK(out[i] == float(P * (P + 1) / 2) * float(at + i));

  CHECK(comm.broadcast(std::string(r == 0 ? "from rank 0" : "x")) == "from rank 0");
  const std::string err = mxd_test::error_of([&] { comm.agree(r != P - 1, "the last rank fails"); });
  CHECK(err == (P == 1 ? std::string() : "rank " + std::to_string(P - 1) + ": ") + "the last rank fails");
  CHECK(mxd_test::error_of([&] { comm.agree(true); }) == "<no mxd::Error>");
  const std::string cfg = P > 1 && r == 1 ? "--k 4" : "--k 8";
  const std::string mismatch = mxd_test::error_of([&] { comm.check_same("the configuration", cfg); });
  if (P > 1) CHECK(mismatch.find("the configuration differs between ranks") != std::string::npos);
  else CHECK(mismatch == "<no mxd::Error>");
}

TEST_CASE("gradient buckets: the sum does not depend on the bucket size") {
  const mxd::Config c = small_config(true);
  mxd::Params<double> a = mxd_test::random_params<double>(c, 40 + world->rank()), b = a;
  mxd::parallel::GradientReducer<double> small(7), large;
  small(*world, a);
  large(*world, b);
  CHECK(same_bits(a, b));
}

TEST_CASE("data parallel, double: 1 and 10 steps equal one process") {
  check_against_single<double>(Mode::data, false, 1);
  check_against_single<double>(Mode::data, true, 10);
}
TEST_CASE("data parallel, float: 10 steps equal one process") {
  check_against_single<float>(Mode::data, false, 10);
}
TEST_CASE("expert parallel, double: 1 and 10 steps equal one process") {
  check_against_single<double>(Mode::experts, false, 1);
  check_against_single<double>(Mode::experts, true, 10);
}
TEST_CASE("expert parallel, float: 1 and 10 steps equal one process") {
  check_against_single<float>(Mode::experts, true, 1);
  check_against_single<float>(Mode::experts, false, 10);
}

TEST_CASE("expert shards: gathered back, they are the full set") {
  const mxd::Config c = small_config(true);
  const mxd::Params<float> full = mxd_test::random_params<float>(c, 3);
  mxd::parallel::ExpertParallel<float> ep(*world, c);
  const mxd::Params<float> mine =
      mxd::parallel::shard_params(full, ep.first_expert(), ep.shards()[world->rank()]);
  mxd::Params<float> back(c);
  mxd::parallel::gather_experts(*world, mine, back, ep.shards(), 0);
  if (world->rank() == 0) CHECK(same_bits(back, full));
}

int main(int argc, char** argv) {
  mxd::parallel::MpiCommunicator comm(&argc, &argv);
  world = &comm;
  doctest::Context ctx(argc, argv);
  if (comm.rank() != 0) ctx.setOption("minimal", true);  // rank 0 reports; others only failures
  return ctx.run();
}
