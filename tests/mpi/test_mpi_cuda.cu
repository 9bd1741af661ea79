// SPDX-License-Identifier: MIT
// The staged device collectives (parallel/cuda.cuh) against the host ones under mpirun: the same
// bits for all-reduce, all-gather, reduce-scatter, broadcast and a device gradient set.
// Exits 77 (ctest: skipped) where no CUDA device is visible.
#include <cstdio>
#include <cstring>
#include <vector>

#include <mxd/cuda.cuh>
#include <mxd/parallel/cuda.cuh>
#include <mxd/parallel/data_parallel.hpp>
#include <mxd/parallel/mpi.hpp>

namespace {

int failures = 0;

void check(bool ok, const char* what, int rank) {
  if (ok) return;
  std::printf("rank %d: FAILED: %s\n", rank, what);
  ++failures;
}

template <class T>
bool same(const mxd::Tensor<T>& a, const mxd::Tensor<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

template <class T>
mxd::Tensor<T> filled(mxd::index_t rows, mxd::index_t cols, int rank, double scale) {
  mxd::Tensor<T> t(rows, cols);
  for (mxd::index_t i = 0; i < t.size(); ++i) t[i] = T(scale * (rank + 1) + 0.1 * double(i % 7) / 3.0);
  return t;
}

template <class T>
bool same_set(const mxd::Params<T>& a, const mxd::Params<T>& b) {
  std::vector<const mxd::Tensor<T>*> tb;
  b.for_each([&](const char*, const mxd::Tensor<T>& t) { tb.push_back(&t); });
  bool ok = true;
  std::size_t i = 0;
  a.for_each([&](const char*, const mxd::Tensor<T>& t) { ok = ok && same(t, *tb[i++]); });
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  mxd::parallel::MpiCommunicator comm(&argc, &argv);
  const int r = comm.rank(), P = comm.size();
  if (mxd::cuda_device_count() == 0) {
    if (r == 0) std::printf("skipped: no CUDA device is visible\n");
    return 77;
  }
  try {
    mxd::parallel::DeviceStaging<double> stage;
    using mxd::Tensor;
    using mxd::cuda;
    // all_reduce
    Tensor<double> h = filled<double>(5, 7, r, 0.3), ref = h;
    Tensor<double, cuda> d = mxd::to_device(h);
    stage.all_reduce(comm, d.view());
    comm.all_reduce(ref.view());
    check(same(mxd::to_host(d), ref), "all_reduce", r);
    // all_gather and reduce_scatter with uneven rows
    std::vector<mxd::index_t> rows(P);
    for (int q = 0; q < P; ++q) rows[q] = q + 1;
    const mxd::index_t total = mxd::parallel::offsets(rows).back();
    Tensor<double> mine = filled<double>(r + 1, 3, r, 1.0), all_ref(total, 3);
    Tensor<double, cuda> all_d(total, 3);
    stage.all_gather(comm, mxd::to_device(mine).view(), all_d.view(), rows);
    comm.all_gather<double>(mine.view(), all_ref.view(), rows);
    check(same(mxd::to_host(all_d), all_ref), "all_gather", r);
    Tensor<double> part = filled<double>(total, 3, r, 0.7), out_ref(r + 1, 3);
    Tensor<double, cuda> out_d(r + 1, 3);
    stage.reduce_scatter(comm, mxd::to_device(part).view(), out_d.view(), rows);
    comm.reduce_scatter<double>(part.view(), out_ref.view(), rows);
    check(same(mxd::to_host(out_d), out_ref), "reduce_scatter", r);
    // broadcast
    Tensor<double, cuda> b = mxd::to_device(filled<double>(2, 2, r, 5.0));
    stage.broadcast(comm, b.view(), 0);
    check(same(mxd::to_host(b), filled<double>(2, 2, 0, 5.0)), "broadcast", r);
    // a gradient set
    mxd::Config c;
    c.d_in = 8; c.d_hidden = 16; c.d_out = 8; c.n_experts = 40; c.k = 4; c.glu = true;
    mxd::Params<double> g(c);
    int i = 0;
    g.for_each([&](const char*, Tensor<double>& t) { t = filled<double>(t.rows(), t.cols(), r, 0.01 * ++i); });
    mxd::Params<double, cuda> gd = mxd::to_device(g);
    stage.all_reduce_grads(comm, gd, mxd::parallel::dense_only);
    mxd::parallel::GradientReducer<double>()(comm, g, mxd::parallel::dense_only);
    check(same_set(mxd::to_host(gd), g), "all_reduce_grads", r);
  } catch (const mxd::Error& e) {
    std::printf("rank %d: error: %s\n", r, e.what());
    return 1;
  }
  if (r == 0 && failures == 0) std::printf("staged device collectives equal the host ones on %d ranks\n", P);
  return failures == 0 ? 0 : 1;
}
