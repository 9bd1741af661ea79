// SPDX-License-Identifier: MIT
/// @file parallel/step.hpp
/// @brief train::step (train/step.hpp) over several processes: Reducers for data parallelism
/// (any model) and for the MxD's sharded experts. The step is the one process's, so a run's
/// weights are those of one process training on the whole batch.
///
///     auto rows = mxd::parallel::batch_rows(B, comm.size());       // each rank's rows of B
///     mxd::parallel::DataParallel<mxd::train::Trainer<mxd::Params<float>>> dp(comm, rows);
///     double l = mxd::train::step(m, x_r, t_r, dp);   // x_r: [rows[rank], I]; l: the batch's
#pragma once

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "../train/step.hpp"
#include "communicator.hpp"
#include "data_parallel.hpp"
#include "expert_parallel.hpp"

namespace mxd::parallel {

/// Each rank steps on its rows of every batch; the loss shares and the gradients are summed.
/// rows: every rank's row count of the current batch (set before each step).
template <class Model>
class DataParallel : public train::Reducer<Model> {
public:
  using T = typename Model::Scalar;
  DataParallel(Communicator& comm, std::vector<index_t> batch_rows)
      : rows(std::move(batch_rows)), comm_(comm) {}

  index_t batch_rows() const override { return offsets(rows).back(); }
  double loss(double share) override {
    comm_.agree(std::isfinite(share),
                mxd::detail::concat("the loss became ", share, " (no weight was updated)"));
    Tensor<double> sum(1, 1);
    sum[0] = share;
    comm_.all_reduce(sum.view());
    return sum[0];
  }
  void gradients(Model& m) override { reduce_(comm_, m.g); }
  // A non-finite gradient in one rank's update stops every rank.
  void update(const std::function<void()>& f) override { comm_.together(f); }
  // AuxK: the residual's mean and variance are the whole batch's, and every rank's tracker
  // records every rank's selection, so dead units are the one process's.
  train::SumAcross sum_across() override {
    return [this](double* v, index_t n) { comm_.all_reduce(View<double>(v, 1, n)); };
  }
  void record(train::DeadUnits& dead, ConstView<std::int32_t> idx, View<T> val) override {
    const index_t B = batch_rows();
    all_idx_.resize(B, idx.cols, false);
    all_val_.resize(B, val.cols, false);
    comm_.all_gather<std::int32_t>(idx, all_idx_.view(), rows);
    comm_.all_gather<T>(val, all_val_.view(), rows);
    dead.record(ConstView<std::int32_t>(all_idx_.view()), all_val_.view());
  }

  std::vector<index_t> rows;

protected:
  Communicator& comm_;
  GradientReducer<T> reduce_;
  Tensor<std::int32_t> all_idx_;  // [B, k] the batch's selection, every rank's rows
  Tensor<T> all_val_;
};

/// The MxD with its experts sharded over the ranks (ExpertParallel): forward and backward are
/// collective, each rank's expert gradients are complete and only the dense ones are summed.
template <class T>
class ExpertParallelStep : public DataParallel<train::Trainer<Params<T>>> {
public:
  using Model = train::Trainer<Params<T>>;
  ExpertParallelStep(Communicator& comm, std::vector<index_t> batch_rows, ExpertParallel<T>& ep)
      : DataParallel<Model>(comm, std::move(batch_rows)), ep_(ep) {}

  void forward(Model& m, InView<T, cpu> x, View<T> y) override {
    ep_.forward(m.p, x, y, m.ws, this->rows);
  }
  void backward(Model& m, InView<T, cpu> x, InView<T, cpu> dy) override {
    ep_.backward(m.p, x, dy, m.ws, m.g);
  }
  void gradients(Model& m) override { this->reduce_(this->comm_, m.g, dense_only); }
  // Sharded experts would need AuxK's dead experts split the same way: not supported.
  train::SumAcross sum_across() override {
    MXD_CHECK(false, "AuxK is not supported with sharded experts (--parallel experts)");
    return {};
  }

private:
  ExpertParallel<T>& ep_;
};

}  // namespace mxd::parallel
