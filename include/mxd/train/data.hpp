// SPDX-License-Identifier: MIT
/// @file train/data.hpp
/// @brief Sources of (x, y) training pairs: a seeded teacher MLP, and activations streamed
/// from safetensors files. Batches are a pure function of the step number, so a run resumed
/// from a checkpoint sees exactly the batches an uninterrupted run would.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../activation.hpp"
#include "../finite.hpp"
#include "../io/safetensors.hpp"
#include "../tensor.hpp"

namespace mxd::train {

/// Where training pairs come from. x: [B, d_in], y: [B, d_out].
template <class T>
class DataSource {
public:
  virtual ~DataSource() = default;
  virtual index_t d_in() const = 0;
  virtual index_t d_out() const = 0;
  /// The training batch of step `step` (0-based), B rows.
  virtual void train_batch(std::uint64_t step, index_t B, Tensor<T>& x, Tensor<T>& y) = 0;
  /// Rows [first, first + count) of that batch: what one of several processes sharing the
  /// batch reads (the same values as train_batch's rows). The default reads the whole batch.
  virtual void train_rows(std::uint64_t step, index_t B, index_t first, index_t count,
                          Tensor<T>& x, Tensor<T>& y) {
    MXD_CHECK(first >= 0 && count >= 0 && first + count <= B, "train_rows: rows [", first, ", ",
              first + count, ") outside a batch of ", B);
    Tensor<T> xa, ya;
    train_batch(step, B, xa, ya);
    x.resize(count, xa.cols(), false);
    y.resize(count, ya.cols(), false);
    std::copy(xa.data() + first * xa.cols(), xa.data() + (first + count) * xa.cols(), x.data());
    std::copy(ya.data() + first * ya.cols(), ya.data() + (first + count) * ya.cols(), y.data());
  }
  /// Number of held-out rows, and rows [first, first + count) of them.
  virtual index_t eval_rows() const = 0;
  virtual void eval_batch(index_t first, index_t count, Tensor<T>& x, Tensor<T>& y) = 0;
};

namespace detail {

inline std::uint64_t mix(std::uint64_t a, std::uint64_t b) {  // splitmix64 of a combined seed
  std::uint64_t z = a * 0x9e3779b97f4a7c15ULL + b + 0x632be59bd9b4e019ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Standard normal by Box-Muller from 53-bit uniforms: identical on every platform.
inline double normal(std::mt19937_64& rng) {
  const double u1 = (static_cast<double>(rng() >> 11) + 1.0) * 0x1p-53;
  const double u2 = static_cast<double>(rng() >> 11) * 0x1p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace detail

/// A dense GELU MLP teacher y = gelu(x W1 + b1) W2 + b2 with x ~ N(0, I_d), weights
/// W1 ~ N(0, 1/d_in), W2 ~ N(0, 1/hidden), b1, b2 ~ N(0, 0.1^2), all from `seed`.
/// Training batches use seeds (seed, step); held-out rows a separate stream.
template <class T>
class Teacher final : public DataSource<T> {
public:
  Teacher(index_t d_in, index_t hidden, index_t d_out, std::uint64_t seed, index_t eval_rows)
      : I_(d_in), H_(hidden), O_(d_out), seed_(seed), eval_(eval_rows),
        W1_(d_in, hidden), b1_(1, hidden), W2_(hidden, d_out), b2_(1, d_out) {
    MXD_CHECK(d_in > 0 && hidden > 0 && d_out > 0 && eval_rows >= 0, "Teacher: sizes ", d_in,
              ", ", hidden, ", ", d_out, " and eval rows ", eval_rows, " must be positive");
    std::mt19937_64 rng(detail::mix(seed, 0x7eac4e5ULL));
    auto fill = [&](Tensor<double>& t, double scale) {
      for (index_t i = 0; i < t.size(); ++i) t[i] = scale * detail::normal(rng);
    };
    fill(W1_, 1.0 / std::sqrt(double(d_in)));
    fill(b1_, 0.1);
    fill(W2_, 1.0 / std::sqrt(double(hidden)));
    fill(b2_, 0.1);
  }

  index_t d_in() const override { return I_; }
  index_t d_out() const override { return O_; }
  index_t eval_rows() const override { return eval_; }

  void train_batch(std::uint64_t step, index_t B, Tensor<T>& x, Tensor<T>& y) override {
    generate(detail::mix(seed_, step + 1), 0, B, x, y);
  }
  void train_rows(std::uint64_t step, index_t B, index_t first, index_t count, Tensor<T>& x,
                  Tensor<T>& y) override {
    MXD_CHECK(first >= 0 && count >= 0 && first + count <= B, "train_rows: rows [", first, ", ",
              first + count, ") outside a batch of ", B);
    generate(detail::mix(seed_, step + 1), first, count, x, y);
  }
  void eval_batch(index_t first, index_t count, Tensor<T>& x, Tensor<T>& y) override {
    MXD_CHECK(first >= 0 && count >= 0 && first + count <= eval_, "Teacher::eval_batch: rows [",
              first, ", ", first + count, ") outside the ", eval_, " held-out rows");
    generate(detail::mix(seed_, 0), first, count, x, y);
  }

private:
  // Row r of a stream is drawn from its own seed, so any slice of rows is reproducible.
  void generate(std::uint64_t stream, index_t first, index_t B, Tensor<T>& x, Tensor<T>& y) {
    x.resize(B, I_, false);
    y.resize(B, O_, false);
    std::vector<double> xr(static_cast<std::size_t>(I_)), h(static_cast<std::size_t>(H_)),
        yr(static_cast<std::size_t>(O_));
    for (index_t r = 0; r < B; ++r) {
      std::mt19937_64 rng(detail::mix(stream, static_cast<std::uint64_t>(first + r)));
      for (index_t i = 0; i < I_; ++i) xr[i] = detail::normal(rng);
      // h[j] = b1[j] + sum_i x[i] W1[i,j], each sum in the order of i; with j innermost the
      // H independent sums vectorise (the data generation otherwise dominates the default
      // job's time). Likewise for y over j.
      std::copy(b1_.data(), b1_.data() + H_, h.begin());
      for (index_t i = 0; i < I_; ++i) {
        const double xi = xr[i];
        const double* w = W1_.data() + i * H_;
        for (index_t j = 0; j < H_; ++j) h[j] += xi * w[j];
      }
      for (index_t j = 0; j < H_; ++j) h[j] = activate(Activation::gelu, h[j]);
      std::copy(b2_.data(), b2_.data() + O_, yr.begin());
      for (index_t j = 0; j < H_; ++j) {
        const double hj = h[j];
        const double* w = W2_.data() + j * O_;
        for (index_t o = 0; o < O_; ++o) yr[o] += hj * w[o];
      }
      for (index_t o = 0; o < O_; ++o) y(r, o) = static_cast<T>(yr[o]);
      for (index_t i = 0; i < I_; ++i) x(r, i) = static_cast<T>(xr[i]);
    }
  }

  index_t I_, H_, O_;
  std::uint64_t seed_;
  index_t eval_;
  Tensor<double> W1_, b1_, W2_, b2_;
};

/// Activations from safetensors files, each holding `x` [T, d_in] and `y` [T, d_out] (F32, F16,
/// BF16 or F64). Rows are read on demand, never whole files. The last `eval_fraction` of every
/// file is held out; training rows are visited in a seeded random order, reshuffled each epoch.
template <class T>
class ActivationFiles final : public DataSource<T> {
public:
  ActivationFiles(const std::vector<std::string>& paths, double eval_fraction, std::uint64_t seed)
      : seed_(seed) {
    MXD_CHECK(!paths.empty(), "ActivationFiles: no --data file given");
    MXD_CHECK(std::isfinite(eval_fraction) && eval_fraction > 0 && eval_fraction < 1,
              "eval fraction = ", eval_fraction, " must be in (0, 1)");
    for (const std::string& p : paths) {
      auto f = std::make_unique<io::SafetensorsReader>(p);
      const auto& xs = f->info("x").shape;
      const auto& ys = f->info("y").shape;
      MXD_CHECK(xs.size() == 2 && ys.size() == 2 && xs[0] == ys[0], p, ": x ",
                io::detail::shape_str(xs), " and y ", io::detail::shape_str(ys),
                " must be [T, d_in] and [T, d_out] with the same T");
      // Widths first: a zero-width file holds any number of rows in no bytes, and the row
      // index below must stay bounded by the file's size.
      MXD_CHECK(xs[1] > 0 && ys[1] > 0, p, ": x ", io::detail::shape_str(xs), " and y ",
                io::detail::shape_str(ys), " must have positive widths d_in and d_out");
      if (files_.empty()) {
        I_ = xs[1];
        O_ = ys[1];
      }
      MXD_CHECK(xs[1] == I_ && ys[1] == O_, p, ": widths d_in = ", xs[1], ", d_out = ", ys[1],
                " differ from the first file's ", I_, ", ", O_);
      const index_t rows = xs[0];
      const index_t held = std::max<index_t>(1, static_cast<index_t>(rows * eval_fraction));
      MXD_CHECK(rows - held > 0, p, ": ", rows, " rows leave none for training");
      for (index_t r = 0; r < rows - held; ++r) train_.push_back({files_.size(), r});
      for (index_t r = rows - held; r < rows; ++r) eval_.push_back({files_.size(), r});
      files_.push_back(std::move(f));
    }
  }

  index_t d_in() const override { return I_; }
  index_t d_out() const override { return O_; }
  index_t eval_rows() const override { return static_cast<index_t>(eval_.size()); }

  void train_batch(std::uint64_t step, index_t B, Tensor<T>& x, Tensor<T>& y) override {
    train_rows(step, B, 0, B, x, y);
  }
  void train_rows(std::uint64_t step, index_t B, index_t first, index_t count, Tensor<T>& x,
                  Tensor<T>& y) override {
    MXD_CHECK(first >= 0 && count >= 0 && first + count <= B, "train_rows: rows [", first, ", ",
              first + count, ") outside a batch of ", B);
    const std::uint64_t n = train_.size();
    x.resize(count, I_, false);
    y.resize(count, O_, false);
    for (index_t r = 0; r < count; ++r) {
      const std::uint64_t pos = step * static_cast<std::uint64_t>(B) + static_cast<std::uint64_t>(first + r);
      shuffle_for(pos / n);
      read_row(train_[order_[pos % n]], r, x, y);
    }
  }
  /// Training rows (all files): processes sharing batches must agree on it.
  index_t train_rows_total() const { return static_cast<index_t>(train_.size()); }

  void eval_batch(index_t first, index_t count, Tensor<T>& x, Tensor<T>& y) override {
    MXD_CHECK(first >= 0 && count >= 0 && first + count <= eval_rows(), "eval rows [", first, ", ",
              first + count, ") outside the ", eval_rows(), " held-out rows");
    x.resize(count, I_, false);
    y.resize(count, O_, false);
    for (index_t r = 0; r < count; ++r) read_row(eval_[first + r], r, x, y);
  }

private:
  struct Row {
    std::size_t file;
    index_t row;
  };

  void shuffle_for(std::uint64_t epoch) {
    if (epoch == epoch_ && !order_.empty()) return;
    order_.resize(train_.size());
    std::iota(order_.begin(), order_.end(), std::uint64_t(0));
    std::mt19937_64 rng(detail::mix(seed_, epoch));
    for (std::size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng() % i]);
    epoch_ = epoch;
  }

  // Reads one (x, y) row; a NaN or Inf in it is an error naming the file and row (the NaN/Inf
  // policy), found while the row is in cache.
  void read_row(const Row& src, index_t r, Tensor<T>& x, Tensor<T>& y) {
    io::SafetensorsReader& f = *files_[src.file];
    T* xr = x.data() + r * I_;
    T* yr = y.data() + r * O_;
    f.read("x", xr, src.row * I_, I_);
    f.read("y", yr, src.row * O_, O_);
    const index_t bx = first_non_finite(xr, I_), by = bx < 0 ? first_non_finite(yr, O_) : -1;
    MXD_CHECK(bx < 0 && by < 0, f.path(), ": ", bx >= 0 ? "x" : "y",
              ": non-finite value at row ", src.row, " (column ", bx >= 0 ? bx : by, ")");
  }

  std::vector<std::unique_ptr<io::SafetensorsReader>> files_;
  std::vector<Row> train_, eval_;
  std::vector<std::uint64_t> order_;
  std::uint64_t epoch_ = 0, seed_;
  index_t I_ = 0, O_ = 0;
};

}  // namespace mxd::train
