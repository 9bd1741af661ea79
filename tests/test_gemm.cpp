// SPDX-License-Identifier: MIT
// The host GEMM (backend/gemm.hpp): right to the dtype's rounding against a float64 sum, and
// an element's bits independent of the rows, columns and threads of the call it arrives in.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <mxd/backend/gemm.hpp>

namespace {

using mxd::index_t;

template <class T>
struct Case {
  bool ta, tb;
  index_t M, N, K;
  std::vector<T> A, B, C;
  index_t lda() const { return ta ? M : K; }
  index_t ldb() const { return tb ? K : N; }
  T a(index_t i, index_t p) const { return ta ? A[p * lda() + i] : A[i * lda() + p]; }
  T b(index_t p, index_t j) const { return tb ? B[j * ldb() + p] : B[p * ldb() + j]; }

  Case(bool ta_, bool tb_, index_t M_, index_t N_, index_t K_, unsigned seed)
      : ta(ta_), tb(tb_), M(M_), N(N_), K(K_), A(M * K), B(K * N), C(M * N) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> nd;
    for (auto* v : {&A, &B, &C})
      for (T& e : *v) e = T(nd(rng));
  }
};

// Every transpose combination, float and double, shapes around the kernel's MR x NR block and
// the kc = 256 K block, on the kernel shape of this build and on others (other vector widths
// run here as pairs or halves of native vectors, so their logic is checked on any machine).
template <class T, class S>
void check_shape(int threads) {
  // Rounding: each term's product and sum add at most about 2 eps relative to sum |a b|.
  const double eps = std::is_same_v<T, float> ? 1.2e-7 : 2.3e-16;
  unsigned seed = 0;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (index_t M : {1, 5, 13, 130})
        for (index_t N : {1, 7, 33, 70})
          for (index_t K : {1, 9, 256, 300, 515}) {
            CAPTURE(ta);
            CAPTURE(tb);
            CAPTURE(M);
            CAPTURE(N);
            CAPTURE(K);
            Case<T> c(ta, tb, M, N, K, ++seed);
            std::vector<T> C = c.C;
            const T alpha = T(0.5), beta = T(-2);
            mxd::detail::gemm<T, S>(threads, ta, tb, M, N, K, alpha, c.A.data(), c.lda(),
                                    c.B.data(), c.ldb(), beta, C.data(), N);
            double worst = 0;
            for (index_t i = 0; i < M; ++i)
              for (index_t j = 0; j < N; ++j) {
                double s = 0, mag = 0;
                for (index_t p = 0; p < K; ++p) {
                  s += double(c.a(i, p)) * double(c.b(p, j));
                  mag += std::abs(double(c.a(i, p)) * double(c.b(p, j)));
                }
                const double want = 0.5 * s - 2.0 * double(c.C[i * N + j]);
                const double bound = (K + 2) * eps * (0.5 * mag + 2.0 * std::abs(double(c.C[i * N + j])));
                worst = std::max(worst, std::abs(double(C[i * N + j]) - want) / bound);
              }
            CHECK(worst <= 1.0);

            // The same products as one row at a time (a 1-row tile) and as a 3-column slice of
            // op(B) (an expert shard): the same bits as in the whole call.
            std::vector<T> whole(M * N), row(N), slice(M * 3);
            mxd::detail::gemm<T, S>(threads, ta, tb, M, N, K, T(1), c.A.data(), c.lda(),
                                    c.B.data(), c.ldb(), T(0), whole.data(), N);
            bool rows_same = true, slice_same = true;
            for (index_t i = 0; i < M; ++i) {
              const T* Ai = ta ? c.A.data() + i : c.A.data() + i * c.lda();
              mxd::detail::gemm<T, S>(1, ta, tb, 1, N, K, T(1), Ai, c.lda(), c.B.data(), c.ldb(),
                                      T(0), row.data(), N);
              rows_same = rows_same && std::memcmp(row.data(), &whole[i * N], N * sizeof(T)) == 0;
            }
            if (N >= 5) {
              const T* Bj = tb ? c.B.data() + 2 * c.ldb() : c.B.data() + 2;
              mxd::detail::gemm<T, S>(threads + 1, ta, tb, M, 3, K, T(1), c.A.data(), c.lda(), Bj,
                                      c.ldb(), T(0), slice.data(), 3);
              for (index_t i = 0; i < M; ++i)
                slice_same = slice_same &&
                             std::memcmp(&slice[i * 3], &whole[i * N + 2], 3 * sizeof(T)) == 0;
            }
            CHECK(rows_same);
            CHECK(slice_same);
          }
}

}  // namespace

TEST_CASE("host GEMM: within rounding of a float64 sum, and each element's bits independent of "
          "the call's rows, columns and threads") {
  using mxd::detail::GemmShape;
  check_shape<float, GemmShape<float>>(2);
  check_shape<double, GemmShape<double>>(3);
  check_shape<float, GemmShape<float, 64>>(1);
  check_shape<double, GemmShape<double, 16>>(2);
  check_shape<float, GemmShape<float, 16>>(2);
}

TEST_CASE("host GEMM: K = 0 gives beta C, and beta = 0 never reads C (NaN there stays out)") {
  std::vector<float> A(4), B(4), C = {1, 2, 3, 4};
  mxd::detail::gemm<float>(2, false, false, 2, 2, 0, 1.f, A.data(), 1, B.data(), 2, 3.f, C.data(), 2);
  CHECK(C == std::vector<float>{3, 6, 9, 12});
  std::vector<float> X = {1, 2, 3, 4}, Y = {1, 0, 0, 1};
  C.assign(4, std::nanf(""));
  mxd::detail::gemm<float>(2, false, false, 2, 2, 2, 1.f, X.data(), 2, Y.data(), 2, 0.f, C.data(), 2);
  CHECK(C == X);
}
