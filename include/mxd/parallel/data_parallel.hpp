// SPDX-License-Identifier: MIT
/// @file parallel/data_parallel.hpp
/// @brief Data parallelism: each rank takes its rows of every global batch, runs the ordinary
/// forward and backward on them, and the gradients are summed across ranks before AdamW, so
/// every rank holds the same weights.
///
///     auto rows = mxd::parallel::batch_rows(B, comm.size());         // rank r: rows[r] of B
///     mxd::forward(p, x_r, y_r, ws);                              // x_r: [rows[rank], I]
///     double l = mxd::loss<float>(Loss::nmse_ref, y_r, t_r, dy_r, B);   // mean over all B rows
///     mxd::backward(p, x_r, dy_r, ws, g);
///     mxd::parallel::GradientReducer<float> reduce;
///     reduce(comm, g);                                            // g = sum over ranks
///     opt.step(p, g, ws.ctx);
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "../params.hpp"
#include "../workspace.hpp"
#include "communicator.hpp"

namespace mxd::parallel {

/// A rank's slice of a batch starts at a multiple of the gate-score tile height where the batch
/// allows, so its tiles are as tall as one process's. (Its rows' bits would match one
/// process's anywhere: the host GEMM computes each element the same way in any tile.)
constexpr index_t row_align = tile_row_multiple;

/// Each rank's rows of a global batch of B rows, in rank order (parallel::split).
inline std::vector<index_t> batch_rows(index_t B, int ranks) {
  MXD_CHECK(B >= ranks, "a batch of ", B, " rows cannot give each of ", ranks,
            " ranks a row (use --batch >= the number of processes)");
  return split(B, ranks, row_align);
}

/// True for the dense (replicated) parameters of a set: under expert parallelism only their
/// gradients are summed across ranks (each rank's expert gradients are already complete).
inline bool dense_only(const ParamDesc& d) { return !d.per_unit; }

/// Sums a gradient set (Params, TranscoderParams; for all tensors anything with
/// for_each(name, tensor)) over the ranks in place. Tensors are packed, in for_each order, into
/// buckets of at most `bucket_elements` values that are all-reduced one at a time: few, large
/// messages, and a fixed order of operations whatever the shapes. Each element's sum is in rank
/// order (Communicator::all_reduce), so the result does not depend on the bucket size.
template <class T>
class GradientReducer {
public:
  explicit GradientReducer(index_t bucket_elements = index_t(1) << 22) : cap_(bucket_elements) {
    MXD_CHECK(cap_ > 0, "GradientReducer: bucket of ", cap_, " elements");
  }

  /// The tensors of g whose descriptor `pick(desc)` accepts (e.g. dense_only).
  template <class Set, class Pick>
  void operator()(Communicator& comm, Set& g, Pick&& pick) {
    reduce(comm, [&](auto&& visit) {
      g.for_each_param([&](const ParamDesc& d, Tensor<T>& t) {
        if (pick(d)) visit(t);
      });
    });
  }
  /// All tensors of g.
  template <class Set>
  void operator()(Communicator& comm, Set& g) {
    reduce(comm, [&](auto&& visit) { g.for_each([&](const char*, Tensor<T>& t) { visit(t); }); });
  }

private:
  struct Part {
    T* dst;
    index_t at, n;
  };

  // each(visit) calls visit(tensor) for the tensors to sum, in order (twice: size, then data).
  template <class Each>
  void reduce(Communicator& comm, Each&& each) {
    if (comm.size() == 1) return;
    index_t total = 0;
    each([&](Tensor<T>& t) { total += t.size(); });
    bucket_.resize(static_cast<std::size_t>(std::min(cap_, total)));
    const index_t cap = std::max<index_t>(1, std::min(cap_, total));
    parts_.clear();
    index_t fill = 0;
    auto flush = [&] {
      if (fill == 0) return;
      comm.all_reduce(View<T>(bucket_.data(), 1, fill));
      for (const Part& p : parts_) std::memcpy(p.dst, bucket_.data() + p.at, p.n * sizeof(T));
      parts_.clear();
      fill = 0;
    };
    each([&](Tensor<T>& t) {
      for (index_t done = 0; done < t.size();) {  // a tensor larger than a bucket spans several
        const index_t n = std::min(t.size() - done, cap - fill);
        std::memcpy(bucket_.data() + fill, t.data() + done, n * sizeof(T));
        parts_.push_back({t.data() + done, fill, n});
        fill += n;
        done += n;
        if (fill == cap) flush();
      }
    });
    flush();
  }

  index_t cap_;
  std::vector<T> bucket_;
  std::vector<Part> parts_;
};

}  // namespace mxd::parallel
