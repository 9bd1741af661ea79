// SPDX-License-Identifier: MIT
/// @file backend/gemm.hpp
/// @brief mxd's own host GEMM: C = alpha op(A) op(B) + beta C on packed panels.
///
/// Every element of C is computed by the same instructions wherever it lies: its dot product
/// over K runs in blocks of gemm_kc terms, each block summed from zero in one vector lane with
/// one multiply-add per term, then added to C. So an element's bits depend only on its row of
/// op(A), its column of op(B), K, alpha and beta: never on M or N, on the thread count, on how
/// the work is split, or on which row tile of a batch the row arrives in. Edges are padded with
/// zeros when packing, so edge tiles run the same kernel as interior ones.
///
/// Why not a BLAS or Eigen: both choose their blocking (and GEMV or scalar code for thin
/// shapes) from M, N and K, so the same row gave other bits in a tile of 55 rows than in a
/// batch of 128; calling them on fixed pieces instead repacks the shared operand for every
/// piece (OpenBLAS ran 2.4x slower than Eigen that way). Here op(A) is packed once per call and
/// shared by all threads; each piece packs its own columns of op(B).
///
/// The kernel is written once with GCC/Clang vector extensions at the target's native width
/// (AVX-512, AVX, else 16 bytes); with GNU extensions on (CMake's default -std=gnu++17) the
/// compiler fuses each multiply-add into one FMA instruction where the target has one.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#include "../error.hpp"
#include "../tensor.hpp"
#include "thread_pool.hpp"

namespace mxd::detail {

#if defined(__AVX512F__)
inline constexpr int simd_bytes = 64;
#elif defined(__AVX__)
inline constexpr int simd_bytes = 32;
#else
inline constexpr int simd_bytes = 16;
#endif

/// The kernel's shape: an MR x NR block of C in registers, NR = NV vectors of T.
/// 6 x 2 vectors fills AVX2's 16 registers (12 accumulators, 2 of op(B), 1 of op(A));
/// AVX-512's 32 registers take 12 x 2.
template <class T, int Bytes = simd_bytes>
struct GemmShape {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "mxd's host GEMM computes float and double");
  static constexpr int bytes = Bytes;
  static constexpr int width = Bytes / int(sizeof(T));  // lanes per vector
  static constexpr int MR = Bytes == 64 ? 12 : 6, NV = 2, NR = NV * width;
  /// K block: an op(A) micro-panel (MR x kc) stays in L1, a piece of op(B) (kc x nc) in L2.
  static constexpr index_t kc = 256;
  /// A piece of C, the unit of parallel work: mc rows x nc columns.
  static constexpr index_t mc = 32 * MR, nc = 512 / index_t(sizeof(T));
};

template <class T, int Bytes>
struct SimdVec {
  typedef T type __attribute__((vector_size(Bytes)));
};

// v = {s, s, ..., s}: an initializer list, which compilers turn into one broadcast. (Out
// parameters, not return values: a wider-than-native vector return changes the ABI.)
template <class V, class T, std::size_t... L>
inline void broadcast_lanes(V& v, T s, std::index_sequence<L...>) {
  v = V{((void)L, s)...};
}
template <class V, class T>
inline void broadcast(V& v, T s) {
  broadcast_lanes(v, s, std::make_index_sequence<sizeof(V) / sizeof(T)>());
}

// f(0), f(1), ..., f(N - 1) with compile-time indices: the kernel's loops over registers
// unrolled by the language rather than by optimiser flags or pragmas (-O2, nvcc's host pass).
template <class F, int... I>
inline void unrolled_impl(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>()), ...);
}
template <int N, class F>
inline void unrolled(F&& f) {
  unrolled_impl(f, std::make_integer_sequence<int, N>());
}

// acc[MR][NR] = sum over p < kc of a[p][i] b[p][j], summed in order from zero.
// a: [kc, MR] packed, b: [kc, NR] packed (aligned to the vector), acc: [MR, NR].
template <class S, class T>
inline void gemm_kernel(index_t kc, const T* __restrict a, const T* __restrict b,
                        T* __restrict acc) {
  using V = typename SimdVec<T, S::bytes>::type;
  constexpr int MR = S::MR, NV = S::NV, W = S::width;
  V c[MR][NV];
  unrolled<MR>([&](auto i) { unrolled<NV>([&](auto v) { c[i][v] = V{}; }); });
  for (index_t p = 0; p < kc; ++p) {
    V bv[NV];
    unrolled<NV>([&](auto v) { bv[v] = *reinterpret_cast<const V*>(b + v * W); });
    unrolled<MR>([&](auto i) {
      V ai;
      broadcast(ai, a[i]);
      unrolled<NV>([&](auto v) { c[i][v] += ai * bv[v]; });
    });
    a += MR;
    b += S::NR;
  }
  unrolled<MR>([&](auto i) {
    unrolled<NV>([&](auto v) { std::memcpy(acc + i * S::NR + v * W, &c[i][v], sizeof(V)); });
  });
}

// The one place partial sums meet C, for full and edge tiles alike (edges go through a copy):
// first block: c = alpha acc (+ beta c unless beta == 0, which never reads c); later blocks:
// c += alpha acc. acc: [MR, NR], c: [MR, NR] with leading dimension ldc.
template <class S, class T>
inline void gemm_update(const T* acc, T* c, index_t ldc, T alpha, T beta, bool first) {
  using V = typename SimdVec<T, S::bytes>::type;
  V va, vb;
  broadcast(va, alpha);
  broadcast(vb, beta);
  for (int i = 0; i < S::MR; ++i)
    for (int v = 0; v < S::NV; ++v) {
      V x, cv;
      std::memcpy(&x, acc + i * S::NR + v * S::width, sizeof(V));
      T* cp = c + i * ldc + v * S::width;
      if (first && beta == T(0)) {
        cv = va * x;
      } else {
        std::memcpy(&cv, cp, sizeof(V));
        cv = first ? va * x + vb * cv : cv + va * x;
      }
      std::memcpy(cp, &cv, sizeof(V));
    }
}

// A growable buffer aligned for the kernel's vector loads.
template <class T>
struct AlignedBuffer {
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<T[], Free> data;
  std::size_t size = 0;
  T* get(std::size_t n) {
    if (n > size) {
      data.reset(static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t(64))));
      size = n;
    }
    return data.get();
  }
};

// op(A) rows [i0, i0 + MR) as a [K, MR] panel, rows past M zero. A: row-major, leading dim lda.
template <class S, class T>
inline void pack_a_panel(bool trans, const T* A, index_t lda, index_t M, index_t K, index_t i0,
                         T* dst) {
  const index_t m = std::min<index_t>(S::MR, M - i0);
  if (trans) {  // op(A)[i][p] = A[p][i]: MR adjacent values per p
    for (index_t p = 0; p < K; ++p) {
      const T* src = A + p * lda + i0;
      T* d = dst + p * S::MR;
      for (index_t i = 0; i < m; ++i) d[i] = src[i];
      for (index_t i = m; i < S::MR; ++i) d[i] = T(0);
    }
  } else {
    for (index_t i = 0; i < S::MR; ++i) {
      if (i < m) {
        const T* src = A + (i0 + i) * lda;
        for (index_t p = 0; p < K; ++p) dst[p * S::MR + i] = src[p];
      } else {
        for (index_t p = 0; p < K; ++p) dst[p * S::MR + i] = T(0);
      }
    }
  }
}

// op(B) rows [p0, p0 + kc) x columns [j0, j0 + n) as panels of NR columns, each [kc, NR],
// columns past n zero. B: row-major, leading dim ldb.
template <class S, class T>
inline void pack_b(bool trans, const T* B, index_t ldb, index_t p0, index_t kc, index_t j0,
                   index_t n, T* dst) {
  for (index_t jr = 0; jr < n; jr += S::NR, dst += kc * S::NR) {
    const index_t w = std::min<index_t>(S::NR, n - jr);
    if (trans) {  // op(B)[p][j] = B[j][p]: each column is a contiguous row of B
      for (index_t j = 0; j < S::NR; ++j) {
        if (j < w) {
          const T* src = B + (j0 + jr + j) * ldb + p0;
          for (index_t p = 0; p < kc; ++p) dst[p * S::NR + j] = src[p];
        } else {
          for (index_t p = 0; p < kc; ++p) dst[p * S::NR + j] = T(0);
        }
      }
    } else {
      for (index_t p = 0; p < kc; ++p) {
        const T* src = B + (p0 + p) * ldb + j0 + jr;
        T* d = dst + p * S::NR;
        for (index_t j = 0; j < w; ++j) d[j] = src[j];
        for (index_t j = w; j < S::NR; ++j) d[j] = T(0);
      }
    }
  }
}

/// C = alpha op(A) op(B) + beta C on up to `threads` threads; beta == 0 never reads C.
/// op(A): [M, K], op(B): [K, N], C: [M, N], all row-major with leading dimensions.
template <class T, class S = GemmShape<T>>
void gemm(int threads, bool trans_a, bool trans_b, index_t M, index_t N, index_t K, T alpha,
          const T* A, index_t lda, const T* B, index_t ldb, T beta, T* C, index_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // no products: C = beta C
    for (index_t i = 0; i < M; ++i)
      for (index_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  constexpr index_t MR = S::MR, NR = S::NR;
  const index_t panels = (M + MR - 1) / MR;
  // op(A) once, shared: panel q holds rows [q MR, q MR + MR) over all K. The buffer belongs to
  // the calling thread, so concurrent GEMMs from different threads do not share it.
  thread_local AlignedBuffer<T> a_buffer;
  T* a_packed = a_buffer.get(std::size_t(panels) * MR * K);
  const index_t pack_grain = std::max<index_t>(1, 16384 / (MR * K));
  const index_t pack_chunks = (panels + pack_grain - 1) / pack_grain;
  auto pack = [&](index_t c) {
    for (index_t q = c * pack_grain; q < std::min(panels, (c + 1) * pack_grain); ++q)
      pack_a_panel<S>(trans_a, A, lda, M, K, q * MR, a_packed + q * MR * K);
  };
  ThreadPool::instance().run(threads, pack_chunks, pack);

  const index_t row_pieces = (M + S::mc - 1) / S::mc, col_pieces = (N + S::nc - 1) / S::nc;
  auto piece = [&](index_t q) {
    // Pieces along a row of C are adjacent, so a thread's next piece reuses op(A)'s rows.
    const index_t m0 = (q / col_pieces) * S::mc, m1 = std::min(M, m0 + S::mc);
    const index_t n0 = (q % col_pieces) * S::nc, n = std::min(S::nc, N - n0);
    thread_local AlignedBuffer<T> b_buffer;
    T* b_packed = b_buffer.get(std::size_t((n + NR - 1) / NR) * NR * S::kc);
    alignas(64) T acc[MR * NR];
    alignas(64) T edge[MR * NR] = {};
    for (index_t p0 = 0; p0 < K; p0 += S::kc) {
      const index_t kc = std::min(S::kc, K - p0);
      pack_b<S>(trans_b, B, ldb, p0, kc, n0, n, b_packed);
      for (index_t i0 = m0; i0 < m1; i0 += MR) {
        const T* a = a_packed + (i0 / MR) * MR * K + p0 * MR;
        const index_t m = std::min(MR, M - i0);
        for (index_t jr = 0; jr < n; jr += NR) {
          gemm_kernel<S>(kc, a, b_packed + (jr / NR) * kc * NR, acc);
          const index_t w = std::min(NR, n - jr);
          T* c = C + i0 * ldc + n0 + jr;
          if (m == MR && w == NR) {
            gemm_update<S>(acc, c, ldc, alpha, beta, p0 == 0);
            continue;
          }
          if (p0 > 0 || beta != T(0))
            for (index_t i = 0; i < m; ++i) std::copy(c + i * ldc, c + i * ldc + w, edge + i * NR);
          gemm_update<S>(acc, edge, NR, alpha, beta, p0 == 0);
          for (index_t i = 0; i < m; ++i) std::copy(edge + i * NR, edge + i * NR + w, c + i * ldc);
        }
      }
    }
  };
  ThreadPool::instance().run(threads, row_pieces * col_pieces, piece);
}

}  // namespace mxd::detail
