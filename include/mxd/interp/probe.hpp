// SPDX-License-Identifier: MIT
/// @file interp/probe.hpp
/// @brief Sparse probing as in the paper: per class, rank features by the difference of class
/// means, fit a 1-D logistic regression on each of the top ones, report the best F1 and
/// balanced accuracy.
///
///     auto rows = mxd::interp::sparse_probe(features, labels);   // features: [S, F], labels: [S]
///     for (auto& r : rows) printf("%d %lld %.3f\n", r.label, r.feature, r.f1);
///
/// Fits use the first 80% of the examples and scores the last 20% (in the given order).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <vector>

#include "../tensor.hpp"

namespace mxd::interp {

/// The paper's probing features: per example (e.g. a text of several tokens), the mean over
/// its rows of every expert's coefficient, 0 where the expert was not selected. Streamed:
///
///     mxd::interp::PooledCoefficients pool(n_examples, cfg.n_experts);
///     for (each batch) { mxd::forward(p, x, y, ws); pool.add(example_of_row, ws.topk_idx, ws.topk_val); }
///     auto rows = mxd::interp::sparse_probe(pool.features(), labels);
class PooledCoefficients {
public:
  PooledCoefficients(index_t n_examples, index_t n_experts)
      : sum_(n_examples, n_experts), rows_(static_cast<std::size_t>(n_examples), 0) {
    MXD_CHECK(n_examples > 0 && n_experts > 0, "PooledCoefficients: n_examples = ", n_examples,
              " and n_experts = ", n_experts, " must be positive");
  }

  /// example: B example ids in [0, n_examples), one per row; idx, val: [B, k] from forward().
  template <class T>
  void add(const std::vector<index_t>& example, const Tensor<std::int32_t>& idx, const Tensor<T>& val) {
    MXD_CHECK(idx.rows() == val.rows() && idx.cols() == val.cols() &&
                  static_cast<index_t>(example.size()) == idx.rows(),
              "PooledCoefficients::add: ", example.size(), " example ids, idx [", idx.rows(), ", ",
              idx.cols(), "], val [", val.rows(), ", ", val.cols(), "]");
    for (index_t r = 0; r < idx.rows(); ++r) {
      const index_t s = example[static_cast<std::size_t>(r)];
      MXD_CHECK(s >= 0 && s < sum_.rows(), "PooledCoefficients::add: example id ", s,
                " is outside [0, ", sum_.rows(), ")");
      ++rows_[static_cast<std::size_t>(s)];
      for (index_t j = 0; j < idx.cols(); ++j) {
        const index_t n = idx(r, j);
        MXD_CHECK(n >= 0 && n < sum_.cols(), "PooledCoefficients::add: expert index ", n,
                  " outside [0, ", sum_.cols(), ")");
        sum_(s, n) += double(val(r, j));
      }
    }
  }

  /// [n_examples, n_experts]: the means (an example with no rows gives zeros).
  Tensor<double> features() const {
    Tensor<double> f(sum_.rows(), sum_.cols());
    for (index_t s = 0; s < f.rows(); ++s)
      for (index_t n = 0; n < f.cols(); ++n)
        f(s, n) = rows_[static_cast<std::size_t>(s)] ? sum_(s, n) / double(rows_[static_cast<std::size_t>(s)]) : 0.0;
    return f;
  }

private:
  Tensor<double> sum_;               // [n_examples, n_experts]
  std::vector<std::int64_t> rows_;   // rows seen per example
};

struct ProbeResult {
  std::int64_t label;   // the class probed (one vs rest)
  index_t feature;      // the best feature for it
  double f1;            // on the held-out examples
  double balanced_accuracy;
  double weight, bias;  // p(label | x) = sigmoid(weight * x + bias)
};

struct Logistic1D {
  double w = 0, b = 0;
};

/// Fits p(y = 1 | x) = sigmoid(w x + b) by Newton's method on the mean log-loss with a tiny
/// L2 term (1e-6) so separable data stays finite. x, y: n values, y in {0, 1}.
inline Logistic1D fit_logistic_1d(const std::vector<double>& x, const std::vector<int>& y) {
  MXD_CHECK(x.size() == y.size() && !x.empty(), "fit_logistic_1d: ", x.size(), " inputs and ",
            y.size(), " labels");
  Logistic1D m;
  const double lambda = 1e-6, n = double(x.size());
  for (int it = 0; it < 100; ++it) {
    double gw = lambda * m.w, gb = 0, hww = lambda, hwb = 0, hbb = 1e-12;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double p = 1 / (1 + std::exp(-(m.w * x[i] + m.b))), r = (p - y[i]) / n;
      const double s = p * (1 - p) / n;
      gw += r * x[i];
      gb += r;
      hww += s * x[i] * x[i];
      hwb += s * x[i];
      hbb += s;
    }
    const double det = hww * hbb - hwb * hwb;
    if (!(det > 0)) break;
    const double dw = (hbb * gw - hwb * gb) / det, db = (hww * gb - hwb * gw) / det;
    m.w -= dw;
    m.b -= db;
    if (std::abs(dw) + std::abs(db) < 1e-12) break;
  }
  return m;
}

/// One row per class: the best of the `top_features` features ranked by |mean in class - mean
/// outside|, judged by held-out F1. features: [S, F], labels: S class ids (at least two classes).
template <class T>
std::vector<ProbeResult> sparse_probe(const Tensor<T>& features, const std::vector<std::int64_t>& labels,
                                      index_t top_features = 8) {
  const index_t S = features.rows(), F = features.cols();
  MXD_CHECK(static_cast<index_t>(labels.size()) == S, "sparse_probe: ", labels.size(),
            " labels for ", S, " examples");
  MXD_CHECK(S >= 10, "sparse_probe: ", S, " examples are too few (need 10)");
  MXD_CHECK(top_features > 0, "sparse_probe: top_features = ", top_features);
  std::map<std::int64_t, index_t> classes;
  for (auto l : labels) ++classes[l];
  MXD_CHECK(classes.size() >= 2, "sparse_probe: all examples have label ", labels[0]);
  const index_t train = S * 4 / 5;
  std::vector<ProbeResult> out;
  for (const auto& [label, count] : classes) {
    // Rank features by the difference of class means (on the training part).
    std::vector<double> in(F, 0), rest(F, 0);
    index_t n_in = 0;
    for (index_t s = 0; s < train; ++s) {
      const bool pos = labels[s] == label;
      n_in += pos;
      for (index_t f = 0; f < F; ++f) (pos ? in : rest)[f] += double(features(s, f));
    }
    if (n_in == 0 || n_in == train) continue;  // no contrast in the training part
    std::vector<index_t> order(F);
    std::vector<double> gap(F);
    for (index_t f = 0; f < F; ++f) {
      order[f] = f;
      gap[f] = std::abs(in[f] / double(n_in) - rest[f] / double(train - n_in));
    }
    const index_t m = std::min(top_features, F);
    std::partial_sort(order.begin(), order.begin() + m, order.end(),
                      [&](index_t a, index_t b) { return gap[a] != gap[b] ? gap[a] > gap[b] : a < b; });
    ProbeResult best{label, -1, -1, 0, 0, 0};
    for (index_t i = 0; i < m; ++i) {
      const index_t f = order[i];
      std::vector<double> x(train);
      std::vector<int> y(train);
      for (index_t s = 0; s < train; ++s) {
        x[s] = double(features(s, f));
        y[s] = labels[s] == label;
      }
      const Logistic1D fit = fit_logistic_1d(x, y);
      index_t tp = 0, fp = 0, fn = 0, tn = 0;
      for (index_t s = train; s < S; ++s) {
        const bool pred = fit.w * double(features(s, f)) + fit.b > 0, pos = labels[s] == label;
        tp += pred && pos; fp += pred && !pos; fn += !pred && pos; tn += !pred && !pos;
      }
      const double f1 = tp ? 2.0 * tp / (2.0 * tp + fp + fn) : 0.0;
      const double tpr = tp + fn ? double(tp) / double(tp + fn) : 0.0;
      const double tnr = tn + fp ? double(tn) / double(tn + fp) : 0.0;
      if (f1 > best.f1) best = {label, f, f1, 0.5 * (tpr + tnr), fit.w, fit.b};
    }
    out.push_back(best);
  }
  return out;
}

}  // namespace mxd::interp
