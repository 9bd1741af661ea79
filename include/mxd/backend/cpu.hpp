// SPDX-License-Identifier: MIT
/// @file backend/cpu.hpp
/// @brief backend<cpu>: the layer's primitives on the host, with mxd's own GEMM
/// (backend/gemm.hpp) and worker threads (backend/thread_pool.hpp).
///
/// Results are bit-identical for any thread count: work is split into pieces whose boundaries
/// depend only on the shapes, never on the number of threads, and each piece is computed by one
/// thread in a fixed order. For the same reason mxd does its own threading and asks Eigen not to.
#pragma once

#ifndef EIGEN_DONT_PARALLELIZE
#define EIGEN_DONT_PARALLELIZE
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../activation.hpp"
#include "../backend.hpp"
#include "../elementwise.hpp"
#include "../finite.hpp"
#include "../tensor.hpp"
#include "gemm.hpp"
#include "thread_pool.hpp"

namespace mxd {

/// Host execution context: how many threads the primitives may use (0 = every CPU the
/// process may run on).
template <>
struct Context<cpu> {
  int threads = 0;

  int resolved_threads() const { return threads > 0 ? threads : detail::available_cpus(); }
};

namespace detail {

// A read-only host view whose T is not deduced from this argument (it converts from View<T>).
template <class T>
using cview = InView<T, cpu>;

// Runs body(i) for i in [0, n) on up to `threads` threads. Each i must be independent work.
template <class F>
void parallel_for(int threads, index_t n, F&& body) {
  ThreadPool::instance().run(threads, n, body);
}

// Splits [0, n) into chunks of `grain` and runs body(begin, end) on each chunk.
template <class F>
void parallel_chunks(int threads, index_t n, index_t grain, F&& body) {
  const index_t chunks = (n + grain - 1) / grain;
  parallel_for(threads, chunks, [&](index_t c) { body(c * grain, std::min(n, (c + 1) * grain)); });
}

// Strict order of gate candidates: larger value first, then smaller index. A total order, so
// the selection is unique and independent of the scan order.
template <class T>
struct Candidate {
  T value;
  std::int32_t index;
  bool operator<(const Candidate& o) const {  // "better than"
    return value > o.value || (value == o.value && index < o.index);
  }
};


}  // namespace detail

template <>
struct backend<cpu> {
  template <class T>
  using cview = detail::cview<T>;
  using Ctx = Context<cpu>;

  /// C = alpha op(A) op(B) + beta C, row-major. op(A): [M, K], op(B): [K, N], C: [M, N].
  /// beta == 0 never reads C. An element's bits depend only on its row of op(A), its column
  /// of op(B), K, alpha and beta (backend/gemm.hpp): not on the thread count, on how many rows
  /// or columns the call has, or on which row tile of a batch a row arrives in.
  template <class T>
  static void gemm(Ctx& ctx, bool trans_a, bool trans_b, T alpha, cview<T> A, cview<T> B, T beta,
                   View<T, cpu> C) {
    const index_t M = trans_a ? A.cols : A.rows, K = trans_a ? A.rows : A.cols;
    const index_t Kb = trans_b ? B.cols : B.rows, N = trans_b ? B.rows : B.cols;
    MXD_CHECK(K == Kb && C.rows == M && C.cols == N, "gemm: shapes [", M, ", ", K, "] x [", Kb,
              ", ", N, "] -> [", C.rows, ", ", C.cols, "] do not match");
    detail::gemm<T>(ctx.resolved_threads(), trans_a, trans_b, M, N, K, alpha, A.data, A.ld,
                    B.data, B.ld, beta, C.data, C.ld);
  }

  /// hpre += b_enc; with GLU (g non-empty) g += b_glu and z = g * act(hpre), else z = act(hpre).
  /// hpre, g, z: [B, H]; b_enc, b_glu: [1, H].
  template <class T>
  static void bias_activation(Ctx& ctx, Activation act, View<T, cpu> hpre, cview<T> b_enc,
                              View<T, cpu> g, cview<T> b_glu, View<T, cpu> z) {
    const index_t H = hpre.cols;
    const bool glu = !g.empty();
    detail::parallel_chunks(ctx.resolved_threads(), hpre.rows, 16, [&](index_t r0, index_t r1) {
      for (index_t r = r0; r < r1; ++r) {
        T* h = hpre.row(r);
        T* zr = z.row(r);
        for (index_t i = 0; i < H; ++i) h[i] += b_enc.data[i];
        if (glu) {
          T* gr = g.row(r);
          for (index_t i = 0; i < H; ++i) zr[i] = detail::glu_act(act, h[i], gr[i], b_glu.data[i]);
        } else {
          for (index_t i = 0; i < H; ++i) zr[i] = activate(act, h[i]);
        }
      }
    });
  }

  /// Widest block of gate scores whose maxima filter the top-k candidates. Blocks shrink (to
  /// 8 at least) so that there are about 2k of them: with fewer than k blocks the filter has no
  /// threshold and every score would stay a candidate. The selection is exact for any width.
  static constexpr index_t topk_block = 64;

  /// Per row of relu(scores + b_gate) (scores + b_gate with relu = false: AuxK's SAELens form
  /// ranks raw pre-activations) the k best (value desc, index asc) as (idx, val). scores:
  /// [B, N] (scratch: its contents afterwards are unspecified; here they are the biased, relu'd
  /// scores), b_gate: [1, N], idx, val: [B, k].
  ///
  /// The k-th largest block maximum t is a lower bound of the k-th best score (k blocks hold a
  /// score >= t each), so only blocks with maximum >= t can hold a winner, and of those only
  /// the scores >= t. A partial selection over these few candidates under the strict total
  /// order gives the same result as a full sort.
  ///
  /// A NaN or Inf score (from x, G or b_gate) would break that bound, so the pass that adds
  /// the bias also checks every score; the first bad one (lowest row, then expert) throws
  /// "gate scores: non-finite value at row R (expert N)" before anything is selected from it;
  /// R counts from row0, the view's first row in the caller's batch (a tile of it).
  template <class T>
  static void gate_topk(Ctx& ctx, View<T, cpu> scores, cview<T> b_gate, index_t k,
                        View<std::int32_t, cpu> idx, View<T, cpu> val, index_t row0 = 0,
                        bool relu = true) {
    const index_t N = scores.cols;
    const index_t L = std::clamp<index_t>(N / (2 * k), 8, topk_block), nblocks = (N + L - 1) / L;
    using Cand = detail::Candidate<T>;
    using Arr = Eigen::Array<T, Eigen::Dynamic, 1>;
    // Flat position r N + n of the first non-finite score; threads cannot throw, so they record.
    constexpr index_t none = std::numeric_limits<index_t>::max();
    std::atomic<index_t> bad(none);
    detail::parallel_chunks(ctx.resolved_threads(), scores.rows, 8, [&](index_t r0, index_t r1) {
      // Per-thread scratch that only grows: a training loop allocates it once.
      thread_local std::vector<T> block_max, maxima;
      thread_local std::vector<Cand> cands;
      block_max.resize(static_cast<std::size_t>(nblocks));
      maxima.resize(static_cast<std::size_t>(nblocks));
      for (index_t r = r0; r < r1; ++r) {
        T* s = scores.row(r);
        for (index_t q = 0; q < nblocks; ++q) {
          const index_t n0 = q * L, len = std::min(L, N - n0);
          Eigen::Map<Arr> blk(s + n0, len);
          blk += Eigen::Map<const Arr>(b_gate.data + n0, len);
          if ((blk * T(0)).sum() != T(0)) {  // x * 0 is NaN exactly for NaN and +-Inf
            index_t n = n0;
            while (std::isfinite(s[n])) ++n;
            index_t seen = bad.load();
            while (r * N + n < seen && !bad.compare_exchange_weak(seen, r * N + n)) {}
            return;  // later rows of this chunk can only be reported after this one
          }
          if (relu) blk = blk.cwiseMax(T(0));
          else blk += T(0);  // -0 + 0 = +0: zeros tie by index, as the GPU stores them
          block_max[q] = blk.maxCoeff();
        }
        // Without k block maxima every score is a candidate: relu's scores are all >= 0.
        T t = relu ? T(0) : std::numeric_limits<T>::lowest();
        if (k <= nblocks) {
          maxima.assign(block_max.begin(), block_max.end());
          std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(),
                           [](T a, T b) { return a > b; });
          t = maxima[k - 1];
        }
        cands.clear();
        for (index_t q = 0; q < nblocks; ++q) {
          if (block_max[q] < t) continue;
          const index_t n0 = q * L, n1 = std::min(N, n0 + L);
          for (index_t n = n0; n < n1; ++n)
            if (s[n] >= t) cands.push_back({s[n], static_cast<std::int32_t>(n)});
        }
        std::partial_sort(cands.begin(), cands.begin() + k, cands.end());  // best first
        for (index_t j = 0; j < k; ++j) {
          idx(r, j) = cands[j].index;
          val(r, j) = cands[j].value;
        }
      }
    });
    const index_t b = bad.load();
    MXD_CHECK(b == none, "gate scores: non-finite value at row ", row0 + b / N, " (expert ",
              b % N, ")");
  }

  /// out[b] = (accumulate ? out[b] : 0) + sum_j w[b,j] rows[idx[b,j]], in slot order (slots
  /// with w 0 add nothing): the forward's mixture v = a C (onto zeros), the backward's
  /// dx += ds G. idx, w: [B, k], rows: [N, C], out: [B, C].
  template <class T>
  static void gather_rows(Ctx& ctx, cview<std::int32_t> idx, cview<T> w, cview<T> rows,
                          View<T, cpu> out, bool accumulate) {
    const index_t C = rows.cols, k = idx.cols;
    // One loop per case (accumulate known in it): GCC then keeps the views in registers.
    auto run = [&](auto acc) {
      detail::parallel_chunks(ctx.resolved_threads(), out.rows, 16, [&](index_t r0, index_t r1) {
        for (index_t r = r0; r < r1; ++r) {
          T* d = out.row(r);
          if (!acc) std::fill(d, d + C, T(0));
          for (index_t j = 0; j < k; ++j) {
            const T a = w(r, j);
            if (a == T(0)) continue;  // unselected slot: contributes nothing
            const T* g = rows.row(idx(r, j));
            for (index_t c = 0; c < C; ++c) d[c] += a * g[c];
          }
        }
      });
    };
    if (accumulate) run(std::true_type{});
    else run(std::false_type{});
  }

  /// y = (accumulate ? y : 0) + u * v + b_out. An empty u is u = 1 (the transcoder), an empty
  /// b_out is 0. u, v, y: [B, O]; b_out: [1, O].
  template <class T>
  static void modulate(Ctx& ctx, cview<T> u, cview<T> v, cview<T> b_out, View<T, cpu> y,
                       bool accumulate) {
    const index_t O = v.cols;
    // One loop per case, u and b_out known present or absent in it; each runs the one body.
    auto run = [&](auto has_u, auto has_b) {
      detail::parallel_chunks(ctx.resolved_threads(), y.rows, 16, [&](index_t r0, index_t r1) {
        for (index_t r = r0; r < r1; ++r) {
          const T* ur = u.row(r);
          const T* vr = v.row(r);
          T* yr = y.row(r);
          for (index_t o = 0; o < O; ++o)
            yr[o] = detail::modulate(yr[o], has_u ? ur[o] : T(1), vr[o],
                                     has_b ? b_out.data[o] : T(0), accumulate);
        }
      });
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (!u.empty()) {
      if (!b_out.empty()) run(yes{}, yes{});
      else run(yes{}, no{});
    } else {
      if (!b_out.empty()) run(no{}, yes{});
      else run(no{}, no{});
    }
  }

  /// out = beta out + sum over rows of A. A: [B, M], out: [1, M].
  template <class T>
  static void col_sum(Ctx& ctx, cview<T> A, T beta, View<T, cpu> out) {
    detail::parallel_chunks(ctx.resolved_threads(), A.cols, 512, [&](index_t c0, index_t c1) {
      T* o = out.data;
      for (index_t c = c0; c < c1; ++c) o[c] = beta == T(0) ? T(0) : beta * o[c];
      for (index_t r = 0; r < A.rows; ++r) {
        const T* a = A.row(r);
        for (index_t c = c0; c < c1; ++c) o[c] += a[c];
      }
    });
  }

  /// du = dy * v, dv = dy * u. All [B, O].
  template <class T>
  static void output_backward(Ctx& ctx, cview<T> dy, cview<T> u, cview<T> v, View<T, cpu> du,
                              View<T, cpu> dv) {
    const index_t O = dy.cols;
    detail::parallel_chunks(ctx.resolved_threads(), dy.rows, 64, [&](index_t r0, index_t r1) {
      for (index_t r = r0; r < r1; ++r)
        for (index_t o = 0; o < O; ++o) {
          du(r, o) = dy(r, o) * v(r, o);
          dv(r, o) = dy(r, o) * u(r, o);
        }
    });
  }

  /// ds[b,j] = val[b,j] > 0 ? dv[b] . C[idx[b,j]] : 0 (relu' of the gate).
  /// idx, val, ds: [B, k], C: [N, O], dv: [B, O].
  template <class T>
  static void expert_coefficient_grad(Ctx& ctx, cview<std::int32_t> idx, cview<T> val,
                                      cview<T> C, cview<T> dv, View<T, cpu> ds) {
    const index_t O = C.cols, k = idx.cols;
    detail::parallel_chunks(ctx.resolved_threads(), idx.rows, 16, [&](index_t r0, index_t r1) {
      for (index_t r = r0; r < r1; ++r)
        for (index_t j = 0; j < k; ++j) {
          T d(0);
          if (val(r, j) > T(0)) {  // a vectorised dot: its order depends on the shapes only
            using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
            d = Eigen::Map<const Vec>(dv.row(r), O).dot(Eigen::Map<const Vec>(C.row(idx(r, j)), O));
          }
          ds(r, j) = d;
        }
    });
  }

  /// Counting sort of the B k (row, slot) pairs by expert, stable in (row, slot) order:
  /// order[offsets[n] .. offsets[n+1]) are the flat positions b k + j with idx[b,j] == n.
  /// idx: [B, k], order: [1, B k], offsets: [1, N + 1].
  static void group_by_expert(Ctx&, cview<std::int32_t> idx, index_t N,
                              View<std::int32_t, cpu> order, View<std::int32_t, cpu> offsets) {
    const index_t P = idx.rows * idx.cols;
    std::int32_t* off = offsets.data;
    std::fill(off, off + N + 1, 0);
    for (index_t p = 0; p < P; ++p) ++off[idx.data[p] + 1];
    for (index_t n = 0; n < N; ++n) off[n + 1] += off[n];
    // off[n] serves as group n's write cursor while filling.
    for (index_t p = 0; p < P; ++p) order.data[off[idx.data[p]]++] = static_cast<std::int32_t>(p);
    // Each off[n] now points at the end of group n, i.e. the old off[n+1]: shift back.
    for (index_t n = N; n > 0; --n) off[n] = off[n - 1];
    off[0] = 0;
  }

  /// For every expert n, over its pairs (b, j) in order:
  ///   dC[n] (+)= sum val[b,j] dv[b];  dG[n] (+)= sum ds[b,j] x[b];  db_gate[n] (+)= sum ds[b,j].
  /// Without `accumulate` unselected experts get zero. dC: [N, O], dG: [N, I], db_gate: [1, N].
  template <class T>
  static void expert_weight_grads(Ctx& ctx, cview<std::int32_t> idx, cview<T> val, cview<T> ds,
                                  cview<std::int32_t> order, cview<std::int32_t> offsets,
                                  cview<T> dv, cview<T> x, View<T, cpu> dC, View<T, cpu> dG,
                                  View<T, cpu> db_gate, bool accumulate) {
    const index_t N = dC.rows, O = dC.cols, I = dG.cols, k = idx.cols;
    detail::parallel_chunks(ctx.resolved_threads(), N, 64, [&](index_t n0, index_t n1) {
      for (index_t n = n0; n < n1; ++n) {
        T* c = dC.row(n);
        T* g = dG.row(n);
        T gb = accumulate ? db_gate.data[n] : T(0);
        if (!accumulate) {
          std::fill(c, c + O, T(0));
          std::fill(g, g + I, T(0));
        }
        for (index_t q = offsets.data[n]; q < offsets.data[n + 1]; ++q) {
          const index_t p = order.data[q], b = p / k;
          const T a = val.data[p], d = ds.data[p];
          if (a != T(0)) {
            const T* dvr = dv.row(b);
            for (index_t o = 0; o < O; ++o) c[o] += a * dvr[o];
          }
          if (d != T(0)) {
            const T* xr = x.row(b);
            for (index_t i = 0; i < I; ++i) g[i] += d * xr[i];
            gb += d;
          }
        }
        db_gate.data[n] = gb;
      }
    });
  }

  /// dhpre = dz * act'(hpre) (* g);  with GLU also dg = dz * act(hpre). All [B, H].
  template <class T>
  static void activation_backward(Ctx& ctx, Activation act, cview<T> hpre, cview<T> g,
                                  cview<T> dz, View<T, cpu> dhpre, View<T, cpu> dg) {
    const index_t H = hpre.cols;
    const bool glu = !g.empty();
    detail::parallel_chunks(ctx.resolved_threads(), hpre.rows, 16, [&](index_t r0, index_t r1) {
      for (index_t r = r0; r < r1; ++r) {
        const T* h = hpre.row(r);
        const T* d = dz.row(r);
        T* dh = dhpre.row(r);
        if (glu) {
          const T* gr = g.row(r);
          T* dgr = dg.row(r);
          for (index_t i = 0; i < H; ++i)
            detail::act_backward_glu(act, h[i], gr[i], d[i], dh[i], dgr[i]);
        } else {
          for (index_t i = 0; i < H; ++i) dh[i] = detail::act_backward(act, h[i], d[i]);
        }
      }
    });
  }
  /// Flat position of the first non-finite value of v, or -1. v: [rows, cols], contiguous.
  /// Chunks are checked in parallel; the lowest bad position is reported whatever the threads.
  template <class T>
  static index_t find_non_finite(Ctx& ctx, cview<T> v) {
    constexpr index_t grain = 1 << 14, none = std::numeric_limits<index_t>::max();
    std::atomic<index_t> bad(none);
    detail::parallel_chunks(ctx.resolved_threads(), v.size(), grain, [&](index_t i0, index_t i1) {
      const index_t i = first_non_finite(v.data + i0, i1 - i0);
      if (i < 0) return;
      index_t seen = bad.load();
      while (i0 + i < seen && !bad.compare_exchange_weak(seen, i0 + i)) {}
    });
    return bad.load() == none ? -1 : bad.load();
  }

  /// The sum of v's squares, in double: fixed chunks of 2^14 values summed in order, so the
  /// result does not depend on the thread count. v: [rows, cols], contiguous.
  template <class T>
  static double sum_squares(Ctx& ctx, cview<T> v) {
    constexpr index_t grain = 1 << 14;
    std::vector<double> part(static_cast<std::size_t>((v.size() + grain - 1) / grain), 0.0);
    detail::parallel_chunks(ctx.resolved_threads(), v.size(), grain, [&](index_t i0, index_t i1) {
      double s = 0;
      for (index_t i = i0; i < i1; ++i) s += double(v.data[i]) * double(v.data[i]);
      part[static_cast<std::size_t>(i0 / grain)] = s;
    });
    double sum = 0;
    for (double s : part) sum += s;
    return sum;
  }

  /// v *= s, each product taken in double and rounded once. v: [rows, cols], contiguous.
  template <class T>
  static void scale(Ctx& ctx, View<T, cpu> v, double s) {
    detail::parallel_chunks(ctx.resolved_threads(), v.size(), 1 << 14, [&](index_t i0, index_t i1) {
      for (index_t i = i0; i < i1; ++i) v.data[i] = static_cast<T>(double(v.data[i]) * s);
    });
  }

  /// out[n] = |C[n]|_2 for every row n, summed in T. C: [N, O], out: [N, 1].
  template <class T>
  static void row_norms(Ctx& ctx, cview<T> C, View<T, cpu> out) {
    each_row(ctx, C.rows, [&](index_t n) { out(n, 0) = std::sqrt(squares(C.row(n), C.cols)); });
  }

  /// out[n] = s[n] A[n] for every row n. s: [N, 1], A, out: [N, C].
  template <class T>
  static void scale_rows(Ctx& ctx, cview<T> s, cview<T> A, View<T, cpu> out) {
    each_row(ctx, A.rows, [&](index_t n) {
      for (index_t c = 0; c < A.cols; ++c) out(n, c) = s(n, 0) * A(n, c);
    });
  }

  /// val[b,j] /= s[idx[b,j]], or 0 where that s is 0. idx, val: [B, k], s: [N, 1].
  template <class T>
  static void divide_selected(Ctx& ctx, cview<std::int32_t> idx, cview<T> s, View<T, cpu> val) {
    each_row(ctx, idx.rows, [&](index_t r) {
      for (index_t j = 0; j < idx.cols; ++j) val(r, j) = detail::divide_or_zero(val(r, j), s(idx(r, j), 0));
    });
  }

  /// One torch.optim.AdamW update of a parameter tensor, in torch's order of operations:
  /// p *= 1 - lr wd;  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2;
  /// p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps). p, g, m, v: same shape.
  template <class T>
  static void adamw_update(Ctx& ctx, View<T, cpu> p, cview<T> g, View<T, cpu> m, View<T, cpu> v,
                           const AdamWStep& s) {
    const auto sc = detail::AdamWScalars<T>::from(s);
    // The GPU's element body, element by element. Not over Eigen arrays: with EIGEN_FAST_MATH
    // (Eigen's default) their packet sqrt is an approximation (AVX-512: float and double;
    // AVX: float) and their scalar sqrt exact, and which elements take the packet path
    // depends on the buffers' addresses, so borrowed and owned parameters parted ways. The
    // loop is memory-bound either way.
    detail::parallel_chunks(ctx.resolved_threads(), p.size(), 1 << 14, [&](index_t i0, index_t i1) {
      for (index_t i = i0; i < i1; ++i) {
        detail::adamw_moments(g.data[i], m.data[i], v.data[i], sc);
        detail::adamw_param(p.data[i], m.data[i], v.data[i], sc);
      }
    });
  }

  /// g[n] -= (g[n] . c[n] / |c[n]|^2) c[n] for every row n. C, g: [N, O].
  template <class T>
  static void remove_parallel_rows(Ctx& ctx, cview<T> C, View<T, cpu> g) {
    const index_t O = C.cols;
    each_row(ctx, C.rows, [&](index_t n) {
      const T* c = C.row(n);
      T* gr = g.row(n);
      T dot(0), sq(0);
      for (index_t o = 0; o < O; ++o) {
        dot += gr[o] * c[o];
        sq += c[o] * c[o];
      }
      if (sq == T(0)) return;
      const T f = dot / sq;
      for (index_t o = 0; o < O; ++o) gr[o] -= f * c[o];
    });
  }

  /// Rescales every row of C to unit L2 norm (zero rows stay zero). C: [N, O].
  template <class T>
  static void normalize_rows(Ctx& ctx, View<T, cpu> C) {
    each_row(ctx, C.rows, [&](index_t n) {
      T* c = C.row(n);
      const T sq = squares(c, C.cols);
      if (sq == T(0)) return;
      const T inv = T(1) / std::sqrt(sq);
      for (index_t o = 0; o < C.cols; ++o) c[o] *= inv;
    });
  }

private:
  // f(n) for every row n < rows, in chunks of rows over the context's threads.
  template <class F>
  static void each_row(Ctx& ctx, index_t rows, F&& f) {
    detail::parallel_chunks(ctx.resolved_threads(), rows, 256, [&](index_t n0, index_t n1) {
      for (index_t n = n0; n < n1; ++n) f(n);
    });
  }
  // sum_o c[o]^2 in T, in order.
  template <class T>
  static T squares(const T* c, index_t O) {
    T sq(0);
    for (index_t o = 0; o < O; ++o) sq += c[o] * c[o];
    return sq;
  }
};

}  // namespace mxd
