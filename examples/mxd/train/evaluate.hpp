// SPDX-License-Identifier: MIT
// mxd train: held-out figures of a trained model (NMSE, FVU, dead fraction) and the per-rank figures of --parallel.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <mxd/parallel/data_parallel.hpp>
#include <mxd/train/data.hpp>

#include "../memory.hpp"
#include "../parallel.hpp"

namespace mxd::cli::training {

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

// Under --parallel every rank predicts its rows of each held-out batch and rank 0 gathers
// the outputs and selections: its result is the single process's (the other ranks' is not
// used).
template <class T, class Model>
Eval evaluate(Model& m, train::DataSource<T>& src, index_t batch, Dist* d = nullptr) {
  Accumulator<T> acc(src.d_out(), m.units());
  Tensor<T> x, t, y, xr, y_all, v_all;
  Tensor<std::int32_t> i_all;
  const bool spread = d && d->comm && !m.on_gpu();
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
  double train_dead = -1;  // with AuxK: fraction of units dead in training at the end
  train::AuxK aux;         // the model's AuxK settings (off: k = 0)
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

}  // namespace mxd::cli::training
