// SPDX-License-Identifier: MIT
/// @file finite.hpp
/// @brief The NaN/Inf policy's checks: a non-finite value in an input, a weight, a gradient or
/// a gate score is an mxd::Error naming the tensor and the row (and column) where it sits.
///
///     mxd::check_finite(x.view(), "x");   // throws "x: non-finite value at row 3 (column 7)"
///
/// The layer checks its gate scores inside top-k (backend), the file readers check what they
/// load, AdamW checks gradients before it writes any weight, and the checkpoint writer refuses
/// non-finite tensors; see include/mxd/README.md, "NaN and Inf".
#pragma once

#include <cmath>
#include <string>

#include <Eigen/Core>

#include "tensor.hpp"

namespace mxd {

/// Flat position of the first non-finite value in data[0, n), or -1 when all are finite.
template <class T>
index_t first_non_finite(const T* data, index_t n) {
  // x * 0 is 0 for finite x and NaN for NaN or +-Inf: one vectorised pass (Eigen's sum) with
  // no branch; the position is looked for only when something is wrong.
  using Arr = Eigen::Array<T, Eigen::Dynamic, 1>;
  if (n == 0 || (Eigen::Map<const Arr>(data, n) * T(0)).sum() == T(0)) return -1;
  for (index_t i = 0; i < n; ++i)
    if (!std::isfinite(data[i])) return i;
  return -1;
}

/// Throws mxd::Error "`what`: non-finite value at row r (column c)" unless every value of the
/// host view v: [rows, cols] is finite.
template <class T>
void check_finite(View<const T, cpu> v, const std::string& what) {
  for (index_t r = 0; r < v.rows; ++r) {
    const index_t c = first_non_finite(v.row(r), v.cols);
    MXD_CHECK(c < 0, what, ": non-finite value ", double(v(r, c)), " at row ", r, " (column ", c,
              ")");
  }
}

}  // namespace mxd
