// SPDX-License-Identifier: MIT
/// @file backend/cuda.cuh
/// @brief backend<cuda>: the layer's primitives on the GPU, with cuBLAS GEMMs, CUB sorting
/// and mxd's own kernels; the same functions, signatures and results as backend<cpu>.
///
/// Everything runs on the context's stream. Results are the same bits on every run: GEMMs are
/// cuBLAS's (deterministic for a given GPU and toolkit), and every reduction here has a fixed
/// order — a segment loop per expert after a stable sort, fixed-size row chunks, fixed trees —
/// with no floating-point atomics. Compared with the CPU backend, results differ only by
/// rounding (fused multiply-adds, the GEMMs' summation order).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_sort.cuh>

#include "../activation.hpp"
#include "../backend.hpp"
#include "../elementwise.hpp"
#include "../tensor.hpp"
#include "cuda/reduce.cuh"
#include "cuda/runtime.cuh"
#include "cuda/topk.cuh"

namespace mxd {
namespace detail::cu {

constexpr int block = 256;

// Carves consecutive, 256-byte aligned arrays out of the context's scratch buffer.
class ScratchCarver {
public:
  template <class U>
  void reserve(index_t count) {
    bytes_ = align(bytes_) + static_cast<std::size_t>(count) * sizeof(U);
  }
  void map(void* base) {
    base_ = static_cast<char*>(base);
    bytes_ = 0;
  }
  template <class U>
  U* take(index_t count) {
    U* p = reinterpret_cast<U*>(base_ + align(bytes_));
    bytes_ = align(bytes_) + static_cast<std::size_t>(count) * sizeof(U);
    return p;
  }
  std::size_t bytes() const { return bytes_; }

private:
  static std::size_t align(std::size_t b) { return (b + 255) / 256 * 256; }
  char* base_ = nullptr;
  std::size_t bytes_ = 0;
};

// Every kernel in these headers is a template, so several .cu files of one program can include
// them: a plain __global__ function's host stub would be defined in each.

// dst[0, n) = bf16(src[0, n)), four at a time (src 16-byte aligned, dst 8-byte aligned).
// V: float4.
template <class V>
__global__ void to_bf16_flat_kernel(const V* src, index_t n4, __nv_bfloat162* dst) {
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < n4;
       e += index_t(gridDim.x) * blockDim.x) {
    const V f = __ldg(src + e);
    dst[2 * e] = __floats2bfloat162_rn(f.x, f.y);
    dst[2 * e + 1] = __floats2bfloat162_rn(f.z, f.w);
  }
}

// dst = bf16(src), contiguous, from a strided or unaligned src: [rows, cols] with leading
// dimension ld. Rows over blockIdx.y (grid-strided), columns over threads: no division.
template <class S>
__global__ void to_bf16_rows_kernel(const S* src, index_t ld, index_t rows, index_t cols,
                                    __nv_bfloat16* dst) {
  for (index_t r = blockIdx.y; r < rows; r += gridDim.y)
    for (index_t c = blockIdx.x * index_t(blockDim.x) + threadIdx.x; c < cols;
         c += index_t(gridDim.x) * blockDim.x)
      dst[r * cols + c] = __float2bfloat16_rn(src[r * ld + c]);
}

// C = beta C (beta = 0 writes zeros). C: [M, N].
template <class T>
__global__ void scale_kernel(T* c, index_t ld, index_t rows, index_t cols, T beta) {
  const index_t n = rows * cols;
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < n;
       e += index_t(gridDim.x) * blockDim.x) {
    T& x = c[(e / cols) * ld + e % cols];
    x = beta == T(0) ? T(0) : beta * x;
  }
}

template <class T>
__global__ void bias_activation_kernel(Activation act, View<T, cuda> hpre, const T* b_enc,
                                       View<T, cuda> g, const T* b_glu, View<T, cuda> z,
                                       bool glu) {
  const index_t H = hpre.cols, n = hpre.rows * H;
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < n;
       e += index_t(gridDim.x) * blockDim.x) {
    const index_t r = e / H, i = e % H;
    const T h = hpre(r, i) + b_enc[i];
    hpre(r, i) = h;
    if (glu) z(r, i) = glu_act(act, h, g(r, i), b_glu[i]);
    else z(r, i) = activate(act, h);
  }
}

// y = (accumulate ? y : 0) + u * v + b_out, u = 1 where u has no data and b_out = 0 where null.
template <class T>
__global__ void modulate_kernel(View<const T, cuda> u, View<const T, cuda> v, const T* b_out,
                                View<T, cuda> y, bool accumulate) {
  const index_t O = y.cols, n = y.rows * O;
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < n;
       e += index_t(gridDim.x) * blockDim.x) {
    const index_t r = e / O, o = e % O;
    y(r, o) = modulate(y(r, o), u.data ? u(r, o) : T(1), v(r, o), b_out ? b_out[o] : T(0),
                       accumulate);
  }
}

// Column sums in fixed chunks of rows: partial[c, m] = sum of A's rows [c R, (c+1) R) at column m.
// Chunks are grid-strided over blockIdx.y (gridDim.y is at most 65535).
template <class T>
__global__ void col_sum_partial_kernel(View<const T, cuda> A, index_t chunk_rows, index_t chunks,
                                       T* partial) {
  const index_t m = blockIdx.x * index_t(blockDim.x) + threadIdx.x;
  if (m >= A.cols) return;
  for (index_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    const index_t r0 = c * chunk_rows, r1 = A.rows < r0 + chunk_rows ? A.rows : r0 + chunk_rows;
    T acc(0);
    for (index_t r = r0; r < r1; ++r) acc += A(r, m);
    partial[c * A.cols + m] = acc;
  }
}

// out[m] = beta out[m] + sum over chunks c of partial[c, m], in chunk order.
template <class T>
__global__ void col_sum_final_kernel(const T* partial, index_t chunks, index_t M, T beta, T* out) {
  const index_t m = blockIdx.x * index_t(blockDim.x) + threadIdx.x;
  if (m >= M) return;
  T acc = beta == T(0) ? T(0) : beta * out[m];
  for (index_t c = 0; c < chunks; ++c) acc += partial[c * M + m];
  out[m] = acc;
}

template <class T>
__global__ void output_backward_kernel(View<const T, cuda> dy, View<const T, cuda> u,
                                       View<const T, cuda> v, View<T, cuda> du, View<T, cuda> dv) {
  const index_t O = dy.cols, n = dy.rows * O;
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < n;
       e += index_t(gridDim.x) * blockDim.x) {
    const index_t r = e / O, o = e % O;
    du(r, o) = dy(r, o) * v(r, o);
    dv(r, o) = dy(r, o) * u(r, o);
  }
}

// One warp per selected pair (b, j): ds[b,j] = val > 0 ? dv[b] . C[idx[b,j]] : 0.
template <class T>
__global__ void expert_coefficient_grad_kernel(View<const std::int32_t, cuda> idx,
                                               View<const T, cuda> val, View<const T, cuda> C,
                                               View<const T, cuda> dv, View<T, cuda> ds) {
  const index_t k = idx.cols, pairs = idx.rows * k, O = C.cols;
  const index_t warps = index_t(gridDim.x) * (blockDim.x / warp_size);
  const int lane = threadIdx.x % warp_size;
  for (index_t p = blockIdx.x * index_t(blockDim.x / warp_size) + threadIdx.x / warp_size;
       p < pairs; p += warps) {
    const index_t r = p / k, j = p % k;
    if (!(val(r, j) > T(0))) {  // warp-uniform branch
      if (lane == 0) ds(r, j) = T(0);
      continue;
    }
    const index_t n = idx(r, j);
    T d(0);
    for (index_t o = lane; o < O; o += warp_size) d += dv(r, o) * C(n, o);
    d = warp_sum(d);
    if (lane == 0) ds(r, j) = d;
  }
}

template <class T>
__global__ void iota_kernel(T* out, index_t n) {
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < n;
       e += index_t(gridDim.x) * blockDim.x)
    out[e] = static_cast<T>(e);
}

// offsets[n] = first position in the sorted keys whose key is >= n, for n in [0, N].
template <class Key>
__global__ void segment_offsets_kernel(const Key* sorted, index_t P, index_t N,
                                       std::int32_t* offsets) {
  for (index_t n = blockIdx.x * index_t(blockDim.x) + threadIdx.x; n <= N;
       n += index_t(gridDim.x) * blockDim.x) {
    index_t lo = 0, hi = P;
    while (lo < hi) {
      const index_t mid = (lo + hi) / 2;
      if (static_cast<index_t>(sorted[mid]) < n) lo = mid + 1;
      else hi = mid;
    }
    offsets[n] = static_cast<std::int32_t>(lo);
  }
}

// Columns each thread of a gather sums at once: that many independent loads in flight per
// gathered row, where a loop over one column at a time waits on each row's load in turn.
constexpr int gather_cols = 4;

// out(n, c) (+)= sum over i in [0, count) of weight(i) rows(row(i), c), in order of i, for
// every column c; the block's threads split the columns, gather_cols at a time. weight(i) == 0
// adds nothing.
template <class T, class Weight, class Row>
__device__ __forceinline__ void gather_sum(index_t n, index_t count, Weight weight, Row row,
                                           View<const T, cuda> rows, View<T, cuda> out,
                                           bool accumulate) {
  const index_t stride = index_t(blockDim.x);
  for (index_t c0 = threadIdx.x; c0 < out.cols; c0 += gather_cols * stride) {
    T acc[gather_cols];
#pragma unroll
    for (int m = 0; m < gather_cols; ++m) {
      const index_t c = c0 + m * stride;
      acc[m] = accumulate && c < out.cols ? out(n, c) : T(0);
    }
    for (index_t i = 0; i < count; ++i) {
      const T a = weight(i);
      if (a == T(0)) continue;  // uniform over the block
      const T* src = rows.data + index_t(row(i)) * rows.ld;
#pragma unroll
      for (int m = 0; m < gather_cols; ++m) {
        const index_t c = c0 + m * stride;
        if (c < out.cols) acc[m] += a * src[c];
      }
    }
#pragma unroll
    for (int m = 0; m < gather_cols; ++m) {
      const index_t c = c0 + m * stride;
      if (c < out.cols) out(n, c) = acc[m];
    }
  }
}

// out[n] (+)= sum of w[p] rows[p / k] over the pairs p = order[q], q in [q0, q1), in order.
template <class T>
__device__ void segment_rows_sum(index_t n, index_t q0, index_t q1, const std::int32_t* order,
                                 index_t k, const T* w, View<const T, cuda> rows,
                                 View<T, cuda> out, bool accumulate) {
  gather_sum(
      n, q1 - q0, [&](index_t i) { return w[order[q0 + i]]; },
      [&](index_t i) { return order[q0 + i] / k; }, rows, out, accumulate);
}

// One block per expert n, over its pairs in sorted (row, slot) order:
//   dC[n] (+)= sum val dv[b];  dG[n] (+)= sum ds x[b];  db_gate[n] (+)= sum ds.
template <class T>
__global__ void expert_weight_grads_kernel(index_t k, const T* val, const T* ds,
                                           const std::int32_t* order, const std::int32_t* offsets,
                                           View<const T, cuda> dv, View<const T, cuda> x,
                                           View<T, cuda> dC, View<T, cuda> dG, T* db_gate,
                                           bool accumulate) {
  const index_t n = blockIdx.x, q0 = offsets[n], q1 = offsets[n + 1];
  segment_rows_sum(n, q0, q1, order, k, val, dv, dC, accumulate);
  segment_rows_sum(n, q0, q1, order, k, ds, x, dG, accumulate);
  if (threadIdx.x == 0) {
    T gb = accumulate ? db_gate[n] : T(0);
    for (index_t q = q0; q < q1; ++q) {
      const T d = ds[order[q]];
      if (d != T(0)) gb += d;
    }
    db_gate[n] = gb;
  }
}

// *first = min(*first, the flat positions of non-finite values of data[0, n)). Integer atomics
// only: the lowest bad position is found whatever the scheduling.
template <class T>
__global__ void first_non_finite_kernel(const T* data, index_t n, unsigned long long* first) {
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x)
    if (!isfinite(data[i])) atomicMin(first, static_cast<unsigned long long>(i));
}

// Sums of squares in double, per block of a fixed grid (sum_squares_blocks): the same
// partition on every GPU, so the same bits.
constexpr int sum_squares_blocks = 256;
template <class T>
__global__ void sum_squares_kernel(const T* data, index_t n, double* partial) {
  __shared__ double shared[block];
  double s = 0;
  for (index_t i = blockIdx.x * index_t(block) + threadIdx.x; i < n; i += index_t(gridDim.x) * block)
    s += double(data[i]) * double(data[i]);
  s = block_sum<block>(s, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
// One block: *out = the sum of the n partials, in a fixed tree.
template <class Acc>
__global__ void sum_partials_kernel(const Acc* partial, int n, Acc* out) {
  __shared__ Acc shared[block];
  Acc s = 0;
  for (int i = threadIdx.x; i < n; i += block) s += partial[i];
  s = block_sum<block>(s, shared);
  if (threadIdx.x == 0) *out = s;
}
template <class T>
__global__ void scale_flat_kernel(T* data, index_t n, double s) {
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x)
    data[i] = static_cast<T>(double(data[i]) * s);
}

// One block per row: out[b] = (accumulate ? out[b] : 0) + sum_j w[b,j] rows[idx[b,j]], in
// slot order.
template <class T>
__global__ void gather_rows_kernel(View<const std::int32_t, cuda> idx, View<const T, cuda> w,
                                   View<const T, cuda> rows, View<T, cuda> out, bool accumulate) {
  const index_t r = blockIdx.x;
  gather_sum(
      r, idx.cols, [&](index_t j) { return w(r, j); }, [&](index_t j) { return idx(r, j); }, rows,
      out, accumulate);
}

template <class T>
__global__ void activation_backward_kernel(Activation act, View<const T, cuda> hpre,
                                           View<const T, cuda> g, View<const T, cuda> dz,
                                           View<T, cuda> dhpre, View<T, cuda> dg, bool glu) {
  const index_t H = hpre.cols, n = hpre.rows * H;
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < n;
       e += index_t(gridDim.x) * blockDim.x) {
    const index_t r = e / H, i = e % H;
    const T h = hpre(r, i), d = dz(r, i);
    if (glu) act_backward_glu(act, h, g(r, i), d, dhpre(r, i), dg(r, i));
    else dhpre(r, i) = act_backward(act, h, d);
  }
}

// The scalars come one by one, not as one AdamWScalars argument: nvcc then orders the operands,
// and chooses the products it fuses into multiply-adds, as for the update written out inline
// (the PTX is the same), so results stay the same bits.
template <class T>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, index_t n, T decay, T w, T b2,
                             T one_minus_b2, T bc2, T eps, T step_size) {
  const AdamWScalars<T> s{decay, w, b2, one_minus_b2, bc2, eps, step_size};
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < n;
       e += index_t(gridDim.x) * blockDim.x) {
    const T ge = g[e];
    T me = m[e], ve = v[e];
    adamw_moments(ge, me, ve, s);
    m[e] = me;
    v[e] = ve;
    T pe = p[e];
    adamw_param(pe, me, ve, s);
    p[e] = pe;
  }
}

// Calls f(n, lane) for each row n < rows this warp owns: one warp per row, grid-stride.
template <class F>
__device__ __forceinline__ void warp_per_row(index_t rows, F&& f) {
  const index_t warps = index_t(gridDim.x) * (blockDim.x / warp_size);
  const int lane = threadIdx.x % warp_size;
  for (index_t n = blockIdx.x * index_t(blockDim.x / warp_size) + threadIdx.x / warp_size;
       n < rows; n += warps)
    f(n, lane);
}

// |C[n]|^2, summed by the warp (every lane gets it).
template <class T, class V>
__device__ __forceinline__ T row_squares(const V& C, index_t n, int lane) {
  T sq(0);
  for (index_t o = lane; o < C.cols; o += warp_size) sq += C(n, o) * C(n, o);
  return warp_sum(sq);
}

// One warp per row n: g[n] -= (g[n] . c[n] / |c[n]|^2) c[n].
template <class T>
__global__ void remove_parallel_rows_kernel(View<const T, cuda> C, View<T, cuda> g) {
  warp_per_row(C.rows, [&](index_t n, int lane) {
    T dot(0);
    for (index_t o = lane; o < C.cols; o += warp_size) dot += g(n, o) * C(n, o);
    dot = warp_sum(dot);
    const T sq = row_squares<T>(C, n, lane);
    if (sq == T(0)) return;
    const T f = dot / sq;
    for (index_t o = lane; o < C.cols; o += warp_size) g(n, o) -= f * C(n, o);
  });
}

// One warp per row: C[n] /= |C[n]| (zero rows stay zero).
template <class T>
__global__ void normalize_rows_kernel(View<T, cuda> C) {
  warp_per_row(C.rows, [&](index_t n, int lane) {
    const T sq = row_squares<T>(C, n, lane);
    if (sq == T(0)) return;
    const T inv = T(1) / sqrt(sq);
    for (index_t o = lane; o < C.cols; o += warp_size) C(n, o) *= inv;
  });
}

// One warp per row: out[n] = |C[n]|.
template <class T>
__global__ void row_norms_kernel(View<const T, cuda> C, View<T, cuda> out) {
  warp_per_row(C.rows, [&](index_t n, int lane) {
    const T sq = row_squares<T>(C, n, lane);
    if (lane == 0) out(n, 0) = sqrt(sq);
  });
}

// out[n, c] = s[n] A[n, c], one thread per element.
template <class T>
__global__ void scale_rows_kernel(View<const T, cuda> s, View<const T, cuda> A, View<T, cuda> out) {
  const index_t C = A.cols, n = A.rows * C;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x)
    out(i / C, i % C) = s(i / C, 0) * A(i / C, i % C);
}

// val[b, j] /= s[idx[b, j]] (0 where s is 0), one thread per slot.
template <class T>
__global__ void divide_selected_kernel(View<const std::int32_t, cuda> idx, View<const T, cuda> s,
                                       View<T, cuda> val) {
  const index_t K = idx.cols, n = idx.rows * K;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x)
    val(i / K, i % K) = divide_or_zero(val(i / K, i % K), s(idx(i / K, i % K), 0));
}

// Blocks of `block` threads with one warp per item.
inline unsigned warp_grid(index_t items) { return grid_for(items * warp_size, block); }

}  // namespace detail::cu

template <>
struct backend<cuda> {
  template <class T>
  using cview = InView<T, cuda>;
  using Ctx = Context<cuda>;
  static constexpr int block = detail::cu::block;

  /// C = alpha op(A) op(B) + beta C, row-major, through cuBLAS; float GEMMs follow ctx.math
  /// (see MathMode). op(A): [M, K], op(B): [K, N], C: [M, N].
  template <class T>
  static void gemm(Ctx& ctx, bool trans_a, bool trans_b, T alpha, cview<T> A, cview<T> B, T beta,
                   View<T, cuda> C) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "backend<cuda>::gemm: float or double");
    const index_t M = trans_a ? A.cols : A.rows, K = trans_a ? A.rows : A.cols;
    const index_t Kb = trans_b ? B.cols : B.rows, N = trans_b ? B.rows : B.cols;
    MXD_CHECK(K == Kb && C.rows == M && C.cols == N, "gemm: shapes [", M, ", ", K, "] x [", Kb,
              ", ", N, "] -> [", C.rows, ", ", C.cols, "] do not match");
    if (M == 0 || N == 0) return;
    constexpr index_t int_max = 0x7fffffff;  // cuBLAS takes int sizes and leading dimensions
    MXD_CHECK(M <= int_max && N <= int_max && K <= int_max && A.ld <= int_max && B.ld <= int_max &&
                  C.ld <= int_max,
              "gemm: [", M, ", ", K, "] x [", K, ", ", N, "] exceeds cuBLAS's int sizes");
    if (K == 0) {  // cuBLAS wants lda >= 1 even then; the product is empty anyway
      MXD_CUDA_LAUNCH(detail::cu::scale_kernel<T>, detail::cu::grid_for(M * N, block), block,
                      ctx.stream(), C.data, C.ld, M, N, beta);
      return;
    }
    // cuBLAS is column-major, where a row-major X reads as X^T: row-major C = op(A) op(B) is
    // column-major C^T = op(B)^T op(A)^T, i.e. the operands swap and keep their op flags.
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasHandle_t h = ctx.cublas();
    if constexpr (std::is_same_v<T, float>) {
      if (ctx.math == MathMode::bf16) {
        gemm_bf16(ctx, op_a, op_b, M, N, K, alpha, A, B, beta, C);
        return;
      }
      const cublasComputeType_t compute =
          ctx.math == MathMode::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
      MXD_CUBLAS_CHECK(cublasGemmEx(h, op_b, op_a, int(N), int(M), int(K), &alpha, B.data,
                                    CUDA_R_32F, int(B.ld), A.data, CUDA_R_32F, int(A.ld), &beta,
                                    C.data, CUDA_R_32F, int(C.ld), compute, CUBLAS_GEMM_DEFAULT));
    } else {
      MXD_CUBLAS_CHECK(cublasDgemm(h, op_b, op_a, int(N), int(M), int(K), &alpha, B.data,
                                   int(B.ld), A.data, int(A.ld), &beta, C.data, int(C.ld)));
    }
  }

  /// gemm's MathMode::bf16 path: bf16 copies of A and B (contiguous), float accumulation
  /// and output. Operands as in gemm after the column-major swap.
  static void gemm_bf16(Ctx& ctx, cublasOperation_t op_a, cublasOperation_t op_b, index_t M,
                        index_t N, index_t K, float alpha, cview<float> A, cview<float> B,
                        float beta, View<float, cuda> C) {
    detail::cu::ScratchCarver plan;
    plan.reserve<__nv_bfloat16>(A.size());
    plan.reserve<__nv_bfloat16>(B.size());
    plan.map(ctx.scratch(plan.bytes()));
    __nv_bfloat16* a = plan.take<__nv_bfloat16>(A.size());
    __nv_bfloat16* b = plan.take<__nv_bfloat16>(B.size());
    to_bf16(ctx, A, a);
    to_bf16(ctx, B, b);
    MXD_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), op_b, op_a, int(N), int(M), int(K), &alpha, b,
                                  CUDA_R_16BF, int(B.cols), a, CUDA_R_16BF, int(A.cols), &beta,
                                  C.data, CUDA_R_32F, int(C.ld), CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
  }

  /// dst = bf16(src), contiguous. src: [rows, cols].
  static void to_bf16(Ctx& ctx, cview<float> src, __nv_bfloat16* dst) {
    namespace cu = detail::cu;
    const index_t n = src.size();
    if (n == 0) return;
    if (src.contiguous() && n % 4 == 0 && reinterpret_cast<std::uintptr_t>(src.data) % 16 == 0) {
      MXD_CUDA_LAUNCH(cu::to_bf16_flat_kernel<float4>, cu::grid_for(n / 4, block), block,
                      ctx.stream(), reinterpret_cast<const float4*>(src.data), n / 4,
                      reinterpret_cast<__nv_bfloat162*>(dst));
      return;
    }
    const dim3 grid(cu::grid_for(src.cols, block), unsigned(src.rows < 65535 ? src.rows : 65535));
    cu::to_bf16_rows_kernel<float><<<grid, block, 0, ctx.stream()>>>(src.data, src.ld, src.rows,
                                                                     src.cols, dst);
    MXD_CUDA_LAUNCH_CHECK();
  }

  /// hpre += b_enc; with GLU (g non-empty) g += b_glu and z = g * act(hpre), else z = act(hpre).
  /// hpre, g, z: [B, H]; b_enc, b_glu: [1, H].
  template <class T>
  static void bias_activation(Ctx& ctx, Activation act, View<T, cuda> hpre, cview<T> b_enc,
                              View<T, cuda> g, cview<T> b_glu, View<T, cuda> z) {
    if (hpre.empty()) return;
    MXD_CUDA_LAUNCH(detail::cu::bias_activation_kernel<T>,
                    detail::cu::grid_for(hpre.size(), block), block, ctx.stream(), act, hpre,
                    b_enc.data, g, b_glu.data, z, !g.empty());
  }

  /// Per row of relu(scores + b_gate) (without relu when relu = false) the k best (value desc,
  /// index asc) as (idx, val), exactly as backend<cpu>. scores: [B, N] (scratch: its contents
  /// afterwards are unspecified), b_gate: [1, N], idx, val: [B, k].
  /// Up to k = 1024 one kernel does it all; beyond, a stable CUB segmented sort orders the
  /// candidates the kernel collected in index order. A non-finite score + bias is an error:
  /// the next ctx.synchronize() throws mxd::Error "gate scores: non-finite value at row R
  /// (expert N)" for the lowest such row, then expert, as backend<cpu> does at once; R counts
  /// from row0, the view's first row in the caller's batch (a tile of it).
  template <class T>
  static void gate_topk(Ctx& ctx, View<T, cuda> scores, cview<T> b_gate, index_t k,
                        View<std::int32_t, cuda> idx, View<T, cuda> val, index_t row0 = 0,
                        bool relu = true) {
    namespace cu = detail::cu;
    const index_t B = scores.rows, N = scores.cols;
    MXD_CHECK(k >= 1 && k <= N, "gate_topk: k = ", k, " must be in [1, ", N, "]");
    if (B == 0) return;
    MXD_CHECK(B * k <= 0x7fffffff, "gate_topk: ", B, " x ", k, " selected pairs exceed CUB's int "
              "item count");
    MXD_CHECK(N <= 0x7fffffff, "gate_topk: ", N, " experts exceed the int32 indices");
    const bool sort = k > cu::topk_rank_limit;
    std::size_t sort_bytes = 0;
    if (sort)
      MXD_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairsDescending(
          nullptr, sort_bytes, static_cast<const T*>(nullptr), static_cast<T*>(nullptr),
          static_cast<const std::int32_t*>(nullptr), static_cast<std::int32_t*>(nullptr),
          int(B * k), int(B), static_cast<const int*>(nullptr), static_cast<const int*>(nullptr),
          ctx.stream()));
    // Scratch only for the sort: up to topk_rank_limit the kernel ranks in shared memory.
    const index_t sorted = sort ? B * k : 0;
    cu::ScratchCarver plan;
    plan.reserve<std::int32_t>(sorted);
    plan.reserve<T>(sorted);
    plan.reserve<std::int32_t>(sorted);
    plan.reserve<T>(sorted);
    plan.reserve<int>(sort ? B + 1 : 0);
    plan.reserve<char>(index_t(sort_bytes));
    plan.map(ctx.scratch(plan.bytes()));
    std::int32_t* cand_idx = plan.take<std::int32_t>(sorted);
    T* cand_val = plan.take<T>(sorted);
    std::int32_t* sorted_idx = plan.take<std::int32_t>(sorted);
    T* sorted_val = plan.take<T>(sorted);
    int* offsets = plan.take<int>(sort ? B + 1 : 0);
    void* temp = plan.take<char>(index_t(sort_bytes));
    cudaStream_t s = ctx.stream();
    // The row's bit patterns in shared memory where the device lets one block hold them.
    int device = 0, optin = 0;
    cudaFuncAttributes fixed{};
    MXD_CUDA_CHECK(cudaGetDevice(&device));
    MXD_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    MXD_CUDA_CHECK(cudaFuncGetAttributes(&fixed, cu::gate_topk_kernel<T, true>));
    const bool shared =
        cu::topk_shared_bytes<T>(true, N, k) + fixed.sharedSizeBytes <= std::size_t(optin);
    const std::size_t dynamic = cu::topk_shared_bytes<T>(shared, N, k);
    auto* kernel = shared ? cu::gate_topk_kernel<T, true> : cu::gate_topk_kernel<T, false>;
    MXD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(dynamic)));
    kernel<<<unsigned(B), cu::topk_block, dynamic, s>>>(
        scores.data, scores.ld, b_gate.data, N, k, cand_idx, cand_val, idx.data, idx.ld, val.data,
        val.ld, ctx.nonfinite_position(), row0, relu);
    MXD_CUDA_LAUNCH_CHECK();
    ctx.nonfinite_check_queued();
    if (!sort) return;
    MXD_CUDA_LAUNCH(cu::row_offsets_kernel<int>, cu::grid_for(B + 1, block), block, s, offsets, B, k);
    MXD_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairsDescending(
        temp, sort_bytes, cand_val, sorted_val, cand_idx, sorted_idx, int(B * k), int(B), offsets,
        offsets + 1, s));
    MXD_CUDA_LAUNCH(cu::scatter_selection_kernel<T>, cu::grid_for(B * k, block), block, s,
                    sorted_idx, sorted_val, B, k, idx.data, idx.ld, val.data, val.ld);
  }

  /// As backend<cpu>::gather_rows: out (+)= sum_j w[:, j] rows[idx[:, j]], one block per row.
  template <class T>
  static void gather_rows(Ctx& ctx, cview<std::int32_t> idx, cview<T> w, cview<T> rows,
                          View<T, cuda> out, bool accumulate) {
    if (out.rows == 0) return;
    MXD_CUDA_LAUNCH(detail::cu::gather_rows_kernel<T>, unsigned(out.rows), block, ctx.stream(),
                    idx, w, rows, out, accumulate);
  }

  /// As backend<cpu>::modulate: y (+)= u * v + b_out, u = 1 and b_out = 0 where empty.
  template <class T>
  static void modulate(Ctx& ctx, cview<T> u, cview<T> v, cview<T> b_out, View<T, cuda> y,
                       bool accumulate) {
    if (y.empty()) return;
    MXD_CUDA_LAUNCH(detail::cu::modulate_kernel<T>, detail::cu::grid_for(y.size(), block), block,
                    ctx.stream(), u.empty() ? cview<T>() : u, v,
                    b_out.empty() ? nullptr : b_out.data, y, accumulate);
  }

  /// out = beta out + sum over rows of A, in fixed chunks of 256 rows. A: [B, M], out: [1, M].
  template <class T>
  static void col_sum(Ctx& ctx, cview<T> A, T beta, View<T, cuda> out) {
    const index_t M = A.cols, chunk_rows = 256, chunks = (A.rows + chunk_rows - 1) / chunk_rows;
    if (M == 0) return;
    detail::cu::ScratchCarver plan;
    plan.reserve<T>(chunks * M);
    plan.map(ctx.scratch(plan.bytes()));
    T* partial = plan.take<T>(chunks * M);
    const unsigned cols_grid = unsigned((M + block - 1) / block);
    if (chunks > 0) {
      const unsigned chunks_grid = unsigned(chunks < 65535 ? chunks : 65535);
      detail::cu::col_sum_partial_kernel<T><<<dim3(cols_grid, chunks_grid), block, 0, ctx.stream()>>>(
          A, chunk_rows, chunks, partial);
      MXD_CUDA_LAUNCH_CHECK();
    }
    MXD_CUDA_LAUNCH(detail::cu::col_sum_final_kernel<T>, cols_grid, block, ctx.stream(), partial,
                    chunks, M, beta, out.data);
  }

  /// du = dy * v, dv = dy * u. All [B, O].
  template <class T>
  static void output_backward(Ctx& ctx, cview<T> dy, cview<T> u, cview<T> v, View<T, cuda> du,
                              View<T, cuda> dv) {
    if (dy.empty()) return;
    MXD_CUDA_LAUNCH(detail::cu::output_backward_kernel<T>, detail::cu::grid_for(dy.size(), block),
                    block, ctx.stream(), dy, u, v, du, dv);
  }

  /// ds[b,j] = val[b,j] > 0 ? dv[b] . C[idx[b,j]] : 0 (relu' of the gate).
  /// idx, val, ds: [B, k], C: [N, O], dv: [B, O].
  template <class T>
  static void expert_coefficient_grad(Ctx& ctx, cview<std::int32_t> idx, cview<T> val,
                                      cview<T> C, cview<T> dv, View<T, cuda> ds) {
    if (idx.empty()) return;
    MXD_CUDA_LAUNCH(detail::cu::expert_coefficient_grad_kernel<T>,
                    detail::cu::warp_grid(idx.size()), block, ctx.stream(), idx, val, C, dv, ds);
  }

  /// A stable radix sort (CUB) of the B k (row, slot) pairs by expert:
  /// order[offsets[n] .. offsets[n+1]) are the flat positions b k + j with idx[b,j] == n, in
  /// increasing order, exactly as backend<cpu>. idx: [B, k], order: [1, B k], offsets: [1, N + 1].
  static void group_by_expert(Ctx& ctx, cview<std::int32_t> idx, index_t N,
                              View<std::int32_t, cuda> order, View<std::int32_t, cuda> offsets) {
    const index_t P = idx.rows * idx.cols;
    MXD_CHECK(idx.contiguous(), "group_by_expert: idx must be contiguous");
    MXD_CHECK(P <= 0x7fffffff, "group_by_expert: ", P, " pairs exceed CUB's int item count");
    int end_bit = 1;
    while ((index_t(1) << end_bit) < N) ++end_bit;  // expert ids fit in [0, end_bit) bits
    // Experts are non-negative, so sorting them as unsigned keys orders them the same way.
    const auto* keys_in = reinterpret_cast<const unsigned int*>(idx.data);
    auto* values_out = order.data;
    std::size_t temp_bytes = 0;
    MXD_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in,
                                                   static_cast<unsigned int*>(nullptr),
                                                   static_cast<const std::int32_t*>(nullptr),
                                                   values_out, int(P), 0, end_bit, ctx.stream()));
    detail::cu::ScratchCarver plan;
    plan.reserve<unsigned int>(P);
    plan.reserve<std::int32_t>(P);
    plan.reserve<char>(index_t(temp_bytes));
    plan.map(ctx.scratch(plan.bytes()));
    unsigned int* keys_out = plan.take<unsigned int>(P);
    std::int32_t* values_in = plan.take<std::int32_t>(P);
    void* temp = plan.take<char>(index_t(temp_bytes));
    cudaStream_t s = ctx.stream();
    if (P > 0) {
      MXD_CUDA_LAUNCH(detail::cu::iota_kernel<std::int32_t>, detail::cu::grid_for(P, block), block,
                      s, values_in, P);
      MXD_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out,
                                                     values_in, values_out, int(P), 0, end_bit, s));
    }
    MXD_CUDA_LAUNCH(detail::cu::segment_offsets_kernel<unsigned int>,
                    detail::cu::grid_for(N + 1, block), block, s, keys_out, P, N, offsets.data);
  }

  /// For every expert n, over its pairs (b, j) in order:
  ///   dC[n] (+)= sum val[b,j] dv[b];  dG[n] (+)= sum ds[b,j] x[b];  db_gate[n] (+)= sum ds[b,j].
  /// Without `accumulate` unselected experts get zero. dC: [N, O], dG: [N, I], db_gate: [1, N].
  template <class T>
  static void expert_weight_grads(Ctx& ctx, cview<std::int32_t> idx, cview<T> val, cview<T> ds,
                                  cview<std::int32_t> order, cview<std::int32_t> offsets,
                                  cview<T> dv, cview<T> x, View<T, cuda> dC, View<T, cuda> dG,
                                  View<T, cuda> db_gate, bool accumulate) {
    const index_t N = dC.rows;
    MXD_CHECK(val.contiguous() && ds.contiguous(), "expert_weight_grads: val and ds must be "
              "contiguous");
    if (N == 0) return;
    MXD_CUDA_LAUNCH(detail::cu::expert_weight_grads_kernel<T>, unsigned(N), block, ctx.stream(),
                    idx.cols, val.data, ds.data, order.data, offsets.data, dv, x, dC, dG,
                    db_gate.data, accumulate);
  }

  /// dhpre = dz * act'(hpre) (* g);  with GLU also dg = dz * act(hpre). All [B, H].
  template <class T>
  static void activation_backward(Ctx& ctx, Activation act, cview<T> hpre, cview<T> g,
                                  cview<T> dz, View<T, cuda> dhpre, View<T, cuda> dg) {
    if (hpre.empty()) return;
    MXD_CUDA_LAUNCH(detail::cu::activation_backward_kernel<T>,
                    detail::cu::grid_for(hpre.size(), block), block, ctx.stream(), act, hpre, g,
                    dz, dhpre, dg, !g.empty());
  }

  /// Flat position of the first non-finite value of v, or -1, as backend<cpu>::find_non_finite.
  /// v: [rows, cols], contiguous. Waits for the stream (returns a number).
  template <class T>
  static index_t find_non_finite(Ctx& ctx, cview<T> v) {
    if (v.empty()) return -1;
    constexpr unsigned long long none = ~0ull;  // all bits set: what the memset writes
    auto* first = static_cast<unsigned long long*>(ctx.scratch(sizeof(unsigned long long)));
    MXD_CUDA_CHECK(cudaMemsetAsync(first, 0xff, sizeof none, ctx.stream()));
    MXD_CUDA_LAUNCH(detail::cu::first_non_finite_kernel<T>, detail::cu::grid_for(v.size(), block),
                    block, ctx.stream(), v.data, v.size(), first);
    unsigned long long host = none;
    MXD_CUDA_CHECK(cudaMemcpyAsync(&host, first, sizeof host, cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
    return host == none ? -1 : static_cast<index_t>(host);
  }

  /// The sum of v's squares in double, as backend<cpu>::sum_squares (another summation order:
  /// equal up to rounding). v: [rows, cols], contiguous. Waits for the stream.
  template <class T>
  static double sum_squares(Ctx& ctx, cview<T> v) {
    if (v.empty()) return 0;
    constexpr int parts = detail::cu::sum_squares_blocks;
    auto* partial = static_cast<double*>(ctx.scratch((parts + 1) * sizeof(double)));
    MXD_CUDA_LAUNCH(detail::cu::sum_squares_kernel<T>, parts, block, ctx.stream(), v.data,
                    v.size(), partial);
    MXD_CUDA_LAUNCH(detail::cu::sum_partials_kernel<double>, 1, block, ctx.stream(), partial, parts,
                    partial + parts);
    double host = 0;
    MXD_CUDA_CHECK(cudaMemcpyAsync(&host, partial + parts, sizeof host, cudaMemcpyDeviceToHost,
                                   ctx.stream()));
    ctx.synchronize();
    return host;
  }

  /// v *= s, as backend<cpu>::scale (the same bits). v: [rows, cols], contiguous.
  template <class T>
  static void scale(Ctx& ctx, View<T, cuda> v, double s) {
    if (v.empty()) return;
    MXD_CUDA_LAUNCH(detail::cu::scale_flat_kernel<T>, detail::cu::grid_for(v.size(), block), block,
                    ctx.stream(), v.data, v.size(), s);
  }

  /// One torch.optim.AdamW update, as backend<cpu>::adamw_update. p, g, m, v: same shape.
  template <class T>
  static void adamw_update(Ctx& ctx, View<T, cuda> p, cview<T> g, View<T, cuda> m,
                           View<T, cuda> v, const AdamWStep& s) {
    if (p.empty()) return;
    const auto sc = detail::AdamWScalars<T>::from(s);
    MXD_CUDA_LAUNCH(detail::cu::adamw_kernel<T>, detail::cu::grid_for(p.size(), block), block,
                    ctx.stream(), p.data, g.data, m.data, v.data, p.size(), sc.decay, sc.w, sc.b2,
                    sc.one_minus_b2, sc.bc2, sc.eps, sc.step_size);
  }

  /// g[n] -= (g[n] . c[n] / |c[n]|^2) c[n] for every row n. C, g: [N, O].
  template <class T>
  static void remove_parallel_rows(Ctx& ctx, cview<T> C, View<T, cuda> g) {
    if (C.rows == 0) return;
    MXD_CUDA_LAUNCH(detail::cu::remove_parallel_rows_kernel<T>, detail::cu::warp_grid(C.rows),
                    block, ctx.stream(), C, g);
  }

  /// Rescales every row of C to unit L2 norm (zero rows stay zero). C: [N, O].
  template <class T>
  static void normalize_rows(Ctx& ctx, View<T, cuda> C) {
    if (C.rows == 0) return;
    MXD_CUDA_LAUNCH(detail::cu::normalize_rows_kernel<T>, detail::cu::warp_grid(C.rows), block,
                    ctx.stream(), C);
  }

  /// out[n] = |C[n]|_2 for every row n. C: [N, O], out: [N, 1].
  template <class T>
  static void row_norms(Ctx& ctx, cview<T> C, View<T, cuda> out) {
    if (C.rows == 0) return;
    MXD_CUDA_LAUNCH(detail::cu::row_norms_kernel<T>, detail::cu::warp_grid(C.rows), block,
                    ctx.stream(), C, out);
  }

  /// out[n] = s[n] A[n] for every row n. s: [N, 1], A, out: [N, C].
  template <class T>
  static void scale_rows(Ctx& ctx, cview<T> s, cview<T> A, View<T, cuda> out) {
    if (A.size() == 0) return;
    MXD_CUDA_LAUNCH(detail::cu::scale_rows_kernel<T>, detail::cu::grid_for(A.size(), block), block,
                    ctx.stream(), s, A, out);
  }

  /// val[b,j] /= s[idx[b,j]], or 0 where that s is 0. idx, val: [B, k], s: [N, 1].
  template <class T>
  static void divide_selected(Ctx& ctx, cview<std::int32_t> idx, cview<T> s, View<T, cuda> val) {
    if (idx.size() == 0) return;
    MXD_CUDA_LAUNCH(detail::cu::divide_selected_kernel<T>, detail::cu::grid_for(idx.size(), block),
                    block, ctx.stream(), idx, s, val);
  }

};

}  // namespace mxd
