// SPDX-License-Identifier: MIT
// Shared helpers of the test suite: golden files, comparisons, seeded random layers.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <mxd/io/params_io.hpp>
#include <mxd/mxd.hpp>

#ifndef MXD_TEST_DATA_DIR
#define MXD_TEST_DATA_DIR "tests/data"
#endif

namespace mxd_test {

inline std::string data_path(const std::string& name) {
  return std::string(MXD_TEST_DATA_DIR) + "/" + name;
}

/// A path for `name` in this test process's own scratch directory (created on first use).
inline std::filesystem::path scratch_path(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("mxd_tests_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return dir / name;
}

inline const std::vector<std::string>& golden_cases() {
  static const std::vector<std::string> cases = {
      "relu_basic", "gelu_glu", "gelu_tanh_skip", "sigmoid", "silu_glu_skip",
      "k_equals_n", "k_one",    "few_positive",   "single_row", "wide_gate"};
  return cases;
}

/// Normwise relative error max|a - b| / max|b|: the scale of each tensor sets the tolerance,
/// so entries near zero are judged against the tensor's magnitude, not their own.
template <class A, class B>
double rel_error(const A* a, const B* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    num = std::max(num, std::abs(double(a[i]) - double(b[i])));
    den = std::max(den, std::abs(double(b[i])));
  }
  return den > 0 ? num / den : num;
}

/// Relative-error budget per scalar type: double keeps ~1e-16 per rounding, so 1e-10 leaves
/// room for the sums over N experts; float's 6e-8 grows to ~1e-5 over the same sums.
template <class T>
constexpr double tolerance() {
  return sizeof(T) == 8 ? 1e-10 : 1e-4;
}

template <class T>
void fill_normal(mxd::Tensor<T>& t, std::mt19937_64& rng, double scale, double shift = 0) {
  std::normal_distribution<double> d(0.0, 1.0);
  for (mxd::index_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(shift + scale * d(rng));
}

/// A random layer whose gate scores are mostly positive (so gradients reach the gate).
template <class T>
mxd::Params<T> random_params(const mxd::Config& c, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  mxd::Params<T> p(c);
  const double si = 1.0 / std::sqrt(double(c.d_in)), sh = 1.0 / std::sqrt(double(c.d_hidden));
  fill_normal(p.E, rng, si);
  fill_normal(p.b_enc, rng, 0.1);
  fill_normal(p.D, rng, sh);
  fill_normal(p.G, rng, si);
  fill_normal(p.b_gate, rng, 0.1, 0.3);
  fill_normal(p.C, rng, 1.0);
  fill_normal(p.b_out, rng, 0.1);
  if (c.glu) {
    fill_normal(p.W_glu, rng, si);
    fill_normal(p.b_glu, rng, 0.1);
  }
  if (c.skip) fill_normal(p.W_skip, rng, si);
  return p;
}

template <class T>
mxd::Tensor<T> random_matrix(mxd::index_t rows, mxd::index_t cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  mxd::Tensor<T> t(rows, cols);
  fill_normal(t, rng, 1.0);
  return t;
}

}  // namespace mxd_test

namespace mxd_test {

/// The message of the mxd::Error that `f` throws, or "<no mxd::Error>" when it throws none.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const mxd::Error& e) {
    return e.what();
  }
  return "<no mxd::Error>";
}

/// Every gradient of `g` against the golden file's grad.<reference name> (in the file's layout),
/// as (name, normwise relative error) pairs in the parameters' order.
template <class T>
std::vector<std::pair<std::string, double>> golden_grad_errors(mxd::io::SafetensorsReader& f,
                                                               const mxd::Grads<T>& g) {
  std::vector<std::pair<std::string, double>> errors;
  g.for_each([&](const char* name, const mxd::Tensor<T>& t) {
    std::vector<std::int64_t> shape;
    const std::vector<T> mine = mxd::io::reference_layout(name, t, shape);
    const auto ref = f.read_all<double>(std::string("grad.") + name, shape);
    errors.emplace_back(name, rel_error(mine.data(), ref.data(), ref.size()));
  });
  return errors;
}

}  // namespace mxd_test
