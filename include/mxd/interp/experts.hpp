// SPDX-License-Identifier: MIT
/// @file interp/experts.hpp
/// @brief Expert n as an explicit matrix W_n = D diag(c_n), and ranks by a rank-revealing QR.
///
///     mxd::Tensor<double> W = mxd::interp::expert_weight(params, 17);     // [H, O]
///     mxd::index_t r = mxd::interp::rank(W);                              // == rank(D) if c_17 has no zero
///
/// With GLU the experts are the same maps of z; only z = (x W_glu^T + b_glu) * act(...) differs.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/QR>

#include "../params.hpp"

namespace mxd::interp {

/// W_n = D diag(c_n): expert n's full map from z [1, H] to its output [1, O], in double.
template <class T>
Tensor<double> expert_weight(const Params<T>& p, index_t n) {
  const index_t H = p.config.d_hidden, O = p.config.d_out;
  MXD_CHECK(n >= 0 && n < p.config.n_experts, "expert ", n, " is outside [0, ",
            p.config.n_experts, ")");
  Tensor<double> W(H, O);
  for (index_t h = 0; h < H; ++h)
    for (index_t o = 0; o < O; ++o) W(h, o) = double(p.D(h, o)) * double(p.C(n, o));
  return W;
}

/// W_n for each expert in `experts`.
template <class T>
std::vector<Tensor<double>> expert_weights(const Params<T>& p, const std::vector<index_t>& experts) {
  std::vector<Tensor<double>> out;
  for (index_t n : experts) out.push_back(expert_weight(p, n));
  return out;
}

/// Numerical rank by column-pivoted Householder QR: the number of |R_ii| above
/// tol = max(rows, cols) * machine epsilon * |R_00| (the usual SVD-style threshold, with
/// |R_00| standing in for the largest singular value). A zero matrix has rank 0.
template <class T>
index_t rank(const Tensor<T>& A) {
  Eigen::MatrixXd M(A.rows(), A.cols());
  for (index_t r = 0; r < A.rows(); ++r)
    for (index_t c = 0; c < A.cols(); ++c) M(r, c) = double(A(r, c));
  Eigen::ColPivHouseholderQR<Eigen::MatrixXd> qr(M);
  const double tol = double(std::max(A.rows(), A.cols())) * std::numeric_limits<double>::epsilon();
  qr.setThreshold(tol);
  return static_cast<index_t>(qr.rank());
}

/// For every expert whose c_n has no zero entry, checks rank(W_n) == rank(D) (diag(c_n) is then
/// invertible). Returns the experts where it fails (empty: the claim holds).
template <class T>
std::vector<index_t> experts_below_rank_of_D(const Params<T>& p, const std::vector<index_t>& experts) {
  Tensor<double> D(p.config.d_hidden, p.config.d_out);
  for (index_t i = 0; i < D.size(); ++i) D[i] = double(p.D[i]);
  const index_t rank_D = rank(D);
  std::vector<index_t> failing;
  for (index_t n : experts) {
    bool zero = false;
    for (index_t o = 0; o < p.config.d_out; ++o) zero = zero || p.C(n, o) == T(0);
    if (!zero && rank(expert_weight(p, n)) != rank_D) failing.push_back(n);
  }
  return failing;
}

}  // namespace mxd::interp
