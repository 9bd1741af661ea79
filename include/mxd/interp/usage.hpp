// SPDX-License-Identifier: MIT
/// @file interp/usage.hpp
/// @brief Expert usage streamed over batches: firing frequency, dead experts, a log10-frequency
/// histogram, mean coefficients, the entropy of usage, and top activating examples per expert.
///
///     mxd::interp::Usage usage(cfg.n_experts);
///     mxd::interp::TopExamples top(cfg.n_experts, 10);
///     for (each batch) { mxd::forward(p, x, y, ws); usage.add(ws.topk_idx, ws.topk_val);
///                        top.add(first_row_of_batch, ws.topk_idx, ws.topk_val); }
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <queue>
#include <vector>

#include "../tensor.hpp"

namespace mxd::interp {

/// Counts, per expert, the rows that selected it with a positive coefficient.
class Usage {
public:
  explicit Usage(index_t n_experts)
      : count_(static_cast<std::size_t>(n_experts), 0), coef_sum_(count_.size(), 0.0) {
    MXD_CHECK(n_experts > 0, "Usage: n_experts = ", n_experts, " must be positive");
  }

  /// idx, val: [B, k] as left by forward() in the workspace.
  template <class T>
  void add(const Tensor<std::int32_t>& idx, const Tensor<T>& val) {
    MXD_CHECK(idx.rows() == val.rows() && idx.cols() == val.cols(), "Usage::add: idx [",
              idx.rows(), ", ", idx.cols(), "] and val [", val.rows(), ", ", val.cols(), "] differ");
    for (index_t i = 0; i < idx.size(); ++i) {
      if (!(val[i] > T(0))) continue;
      const index_t n = idx[i];
      MXD_CHECK(n >= 0 && n < static_cast<index_t>(count_.size()), "Usage::add: expert index ", n,
                " outside [0, ", count_.size(), ")");
      ++count_[n];
      coef_sum_[n] += double(val[i]);
    }
    rows_ += idx.rows();
  }

  index_t rows() const { return rows_; }
  index_t count(index_t n) const {
    MXD_CHECK(n >= 0 && n < static_cast<index_t>(count_.size()), "Usage: expert ", n,
              " is outside [0, ", count_.size(), ")");
    return count_[static_cast<std::size_t>(n)];
  }
  /// Fraction of rows that selected expert n.
  double frequency(index_t n) const { return rows_ ? double(count(n)) / double(rows_) : 0.0; }
  /// Mean coefficient of expert n over the rows that selected it (0 if none did).
  double mean_coefficient(index_t n) const {
    return count(n) ? coef_sum_[n] / double(count(n)) : 0.0;
  }
  /// Experts never selected.
  std::vector<index_t> dead() const {
    std::vector<index_t> d;
    for (std::size_t n = 0; n < count_.size(); ++n)
      if (count_[n] == 0) d.push_back(static_cast<index_t>(n));
    return d;
  }
  double dead_fraction() const { return double(dead().size()) / double(count_.size()); }
  /// Shannon entropy (nats) of the distribution of selections over experts; log(N) is uniform.
  double entropy() const {
    double total = 0, h = 0;
    for (auto c : count_) total += double(c);
    if (total == 0) return 0;
    for (auto c : count_)
      if (c) h -= double(c) / total * std::log(double(c) / total);
    return h;
  }
  /// Histogram of log10(frequency) of the live experts over `bins` equal bins of [lo, hi];
  /// frequencies below 10^lo land in the first bin.
  std::vector<index_t> log10_histogram(int bins, double lo, double hi) const {
    MXD_CHECK(bins > 0 && hi > lo, "log10_histogram: bins = ", bins, ", range [", lo, ", ", hi, "]");
    std::vector<index_t> h(static_cast<std::size_t>(bins), 0);
    for (std::size_t n = 0; n < count_.size(); ++n) {
      if (!count_[n]) continue;
      const double f = std::log10(frequency(static_cast<index_t>(n)));
      const int b = std::clamp(static_cast<int>((f - lo) / (hi - lo) * bins), 0, bins - 1);
      ++h[b];
    }
    return h;
  }
  /// Experts by descending count (ties by index), at most `n` (n >= 0).
  std::vector<index_t> most_used(index_t n) const {
    MXD_CHECK(n >= 0, "Usage::most_used: n = ", n, " must be >= 0");
    std::vector<index_t> order(count_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<index_t>(i);
    const index_t m = std::min<index_t>(n, static_cast<index_t>(order.size()));
    std::partial_sort(order.begin(), order.begin() + m, order.end(), [&](index_t a, index_t b) {
      return count_[a] != count_[b] ? count_[a] > count_[b] : a < b;
    });
    order.resize(static_cast<std::size_t>(m));
    return order;
  }

private:
  std::vector<std::int64_t> count_;
  std::vector<double> coef_sum_;
  index_t rows_ = 0;
};

/// The `per_expert` rows with the largest coefficient for every expert, kept in bounded heaps.
class TopExamples {
public:
  struct Example {
    index_t row;
    double value;
  };

  TopExamples(index_t n_experts, index_t per_expert)
      : heaps_(static_cast<std::size_t>(n_experts)), keep_(per_expert) {
    MXD_CHECK(n_experts > 0 && per_expert > 0, "TopExamples: n_experts = ", n_experts,
              " and per_expert = ", per_expert, " must be positive");
  }

  /// idx, val: [B, k] of a batch whose first row has id `first_row`.
  template <class T>
  void add(index_t first_row, const Tensor<std::int32_t>& idx, const Tensor<T>& val) {
    MXD_CHECK(idx.rows() == val.rows() && idx.cols() == val.cols(), "TopExamples::add: idx [",
              idx.rows(), ", ", idx.cols(), "] and val [", val.rows(), ", ", val.cols(), "] differ");
    for (index_t r = 0; r < idx.rows(); ++r)
      for (index_t j = 0; j < idx.cols(); ++j) {
        const double v = double(val(r, j));
        if (!(v > 0)) continue;
        const index_t n = idx(r, j);
        MXD_CHECK(n >= 0 && n < static_cast<index_t>(heaps_.size()), "TopExamples::add: expert index ",
                  n, " outside [0, ", heaps_.size(), ")");
        auto& h = heaps_[static_cast<std::size_t>(n)];
        const Example e{first_row + r, v};
        if (static_cast<index_t>(h.size()) < keep_) {
          h.push(e);
        } else if (worse(h.top(), e)) {
          h.pop();
          h.push(e);
        }
      }
  }

  /// Expert n's examples, largest value first (ties: smaller row first).
  std::vector<Example> top(index_t n) const {
    MXD_CHECK(n >= 0 && n < static_cast<index_t>(heaps_.size()), "TopExamples: expert ", n,
              " is outside [0, ", heaps_.size(), ")");
    auto h = heaps_[static_cast<std::size_t>(n)];
    std::vector<Example> out;
    for (; !h.empty(); h.pop()) out.push_back(h.top());
    std::reverse(out.begin(), out.end());
    return out;
  }

private:
  // a ranks below b: smaller value, or equal value and larger row id.
  static bool worse(const Example& a, const Example& b) {
    return a.value < b.value || (a.value == b.value && a.row > b.row);
  }
  struct Worse {
    bool operator()(const Example& a, const Example& b) const { return worse(b, a); }
  };
  std::vector<std::priority_queue<Example, std::vector<Example>, Worse>> heaps_;
  index_t keep_;
};

}  // namespace mxd::interp
