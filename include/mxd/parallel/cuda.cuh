// SPDX-License-Identifier: MIT
/// @file parallel/cuda.cuh
/// @brief The Communicator's collectives on device (CUDA) views, staged through host memory:
/// each call copies the device data to a host buffer, runs the host collective (same rank-
/// order sums, same bits on every rank) and copies the result back. Works with any MPI, also
/// one that is not CUDA-aware; NCCL is not used.
///
///     mxd::parallel::DeviceStaging<float> stage;               // host buffers, reused
///     stage.all_reduce(comm, grads.E.view());             // a View<float, mxd::cuda>
///     stage.all_reduce_grads(comm, grads);                // a device gradient set, bucketed
///
/// Include from a .cu file with <mxd/cuda.cuh>; link mxd::cuda and mxd::mpi.
#pragma once

#include <vector>

#include "../cuda.cuh"
#include "communicator.hpp"

namespace mxd::parallel {

template <class T>
class DeviceStaging {
public:
  /// v = sum over ranks of v. v: device, contiguous.
  void all_reduce(Communicator& comm, View<T, cuda> v) {
    if (comm.size() == 1) return;
    down(v, a_);
    comm.all_reduce(a_.view());
    copy_to_device<T>(a_.view(), v);
  }

  /// out = every rank's in, stacked in rank order. in: [rows[rank], C], out: [sum rows, C].
  void all_gather(Communicator& comm, InView<T, cuda> in, View<T, cuda> out,
                  const std::vector<index_t>& rows) {
    down(in, a_);
    b_.resize(out.rows, out.cols, false);
    comm.all_gather<T>(a_.view(), b_.view(), rows);
    copy_to_device<T>(b_.view(), out);
  }

  /// out = rank-order sum of every rank's rows of in for this rank. in: [sum rows, C],
  /// out: [rows[rank], C].
  void reduce_scatter(Communicator& comm, InView<T, cuda> in, View<T, cuda> out,
                      const std::vector<index_t>& rows) {
    down(in, a_);
    b_.resize(out.rows, out.cols, false);
    comm.reduce_scatter<T>(a_.view(), b_.view(), rows);
    copy_to_device<T>(b_.view(), out);
  }

  /// v = root's v on every rank.
  void broadcast(Communicator& comm, View<T, cuda> v, int root = 0) {
    if (comm.size() == 1) return;
    down(v, a_);
    comm.broadcast(a_.view(), root);
    copy_to_device<T>(a_.view(), v);
  }

  /// Sums a device gradient set (Params or TranscoderParams on cuda) over the ranks: the
  /// tensors whose descriptor `pick(desc)` accepts (e.g. dense_only; all by default) are packed
  /// into one host buffer, all-reduced and copied back.
  template <class Set, class Pick>
  void all_reduce_grads(Communicator& comm, Set& g, Pick&& pick) {
    if (comm.size() == 1) return;
    index_t total = 0;
    g.for_each_param([&](const ParamDesc& d, Tensor<T, cuda>& t) {
      if (pick(d)) total += t.size();
    });
    a_.resize(1, total, false);
    index_t at = 0;
    g.for_each_param([&](const ParamDesc& d, Tensor<T, cuda>& t) {
      if (!pick(d)) return;
      copy_to_host<T>(t.view(), View<T>(a_.data() + at, t.rows(), t.cols()));
      at += t.size();
    });
    comm.all_reduce(a_.view());
    at = 0;
    g.for_each_param([&](const ParamDesc& d, Tensor<T, cuda>& t) {
      if (!pick(d)) return;
      copy_to_device<T>(ConstView<T>(a_.data() + at, t.rows(), t.cols()), t.view());
      at += t.size();
    });
  }
  template <class Set>
  void all_reduce_grads(Communicator& comm, Set& g) {
    all_reduce_grads(comm, g, [](const ParamDesc&) { return true; });
  }

private:
  static void down(InView<T, cuda> v, Tensor<T>& host) {
    host.resize(v.rows, v.cols, false);
    copy_to_host<T>(v, host.view());
  }
  Tensor<T> a_, b_;  // host staging, grown to the largest message
};

}  // namespace mxd::parallel
