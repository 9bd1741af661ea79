// SPDX-License-Identifier: MIT
/// @file backend/cuda/runtime.cuh
/// @brief The CUDA runtime side of mxd::cuda: checked calls, device memory, the execution
/// context (stream, cuBLAS handle, math mode, scratch) and host <-> device copies.
///
///     mxd::Params<float> host = ...;                           // e.g. io::load_params
///     mxd::Params<float, mxd::cuda> p = mxd::to_device(host);  // same names, device memory
///     mxd::Tensor<float, mxd::cuda> x = mxd::to_device(x_host);
///     ... forward / backward / AdamW exactly as on the CPU ...
///     mxd::Params<float> back = mxd::to_host(p);               // e.g. for io::save_params
///
/// Every CUDA and cuBLAS status is checked and turned into mxd::Error naming the call and code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../../device.hpp"
#include "../../error.hpp"
#include "../../optim.hpp"
#include "../../params.hpp"
#include "../../tensor.hpp"

/// Throws mxd::Error naming the call, its CUDA error code and message unless it succeeded.
/// The runtime's last-error slot is cleared first, so a caught failure (say, an allocation
/// too large) is not reported again by the next launch check.
#define MXD_CUDA_CHECK(call)                                                                  \
  do {                                                                                        \
    const cudaError_t mxd_status_ = (call);                                                   \
    if (mxd_status_ != cudaSuccess) {                                                         \
      (void)cudaGetLastError();                                                               \
      throw ::mxd::Error(::mxd::detail::concat(#call, " failed: ", cudaGetErrorName(mxd_status_), \
                                               " (", cudaGetErrorString(mxd_status_), ") at ",   \
                                               __FILE__, ":", __LINE__));                       \
    }                                                                                         \
  } while (0)

/// Throws mxd::Error naming the call and its cuBLAS status unless it succeeded.
#define MXD_CUBLAS_CHECK(call)                                                                 \
  do {                                                                                         \
    const cublasStatus_t mxd_status_ = (call);                                                 \
    if (mxd_status_ != CUBLAS_STATUS_SUCCESS)                                                  \
      throw ::mxd::Error(::mxd::detail::concat(#call, " failed: ", cublasGetStatusName(mxd_status_), \
                                               " at ", __FILE__, ":", __LINE__));                 \
  } while (0)

/// Checks the launch that precedes it (a bad configuration surfaces here, not later).
#define MXD_CUDA_LAUNCH_CHECK() MXD_CUDA_CHECK(cudaGetLastError())

/// Launches `kernel<<<grid, threads, 0, stream>>>(args...)` and checks the launch.
#define MXD_CUDA_LAUNCH(kernel, grid, threads, stream, ...)   \
  do {                                                       \
    kernel<<<(grid), (threads), 0, (stream)>>>(__VA_ARGS__); \
    MXD_CUDA_LAUNCH_CHECK();                                 \
  } while (0)

namespace mxd {

namespace detail {

// cuda_device_count's verdict on what cudaGetDeviceCount said: `status` and `count` are its
// result, `driver_version` cudaDriverGetVersion's (0 where no driver is installed at all).
inline int device_count_verdict(cudaError_t status, int count, int driver_version) {
  if (status == cudaSuccess) return count;
  // No GPU, or no driver library at all (the runtime then reports an insufficient driver).
  if (status == cudaErrorNoDevice ||
      (status == cudaErrorInsufficientDriver && driver_version == 0))
    return 0;
  throw Error(concat("cudaGetDeviceCount failed: ", cudaGetErrorName(status), " (",
                     cudaGetErrorString(status), "; driver supports CUDA ", driver_version / 1000,
                     ".", driver_version % 1000 / 10, ", runtime needs ", CUDART_VERSION / 1000,
                     ".", CUDART_VERSION % 1000 / 10, ")"));
}

}  // namespace detail

/// Number of CUDA devices visible to this process: 0 (not an error) where there is no GPU or
/// no driver installed, so callers can skip GPU work. Any other failure (a driver too old
/// for this runtime, a device that cannot be opened) throws mxd::Error naming the CUDA error:
/// a broken setup must not pass for a machine without a GPU.
inline int cuda_device_count() {
  int n = 0, driver = 0;
  const cudaError_t status = cudaGetDeviceCount(&n);
  (void)cudaGetLastError();  // the failure is sticky in the last-error slot: clear it
  if (status != cudaSuccess && cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  return detail::device_count_verdict(status, n, driver);
}

/// Where memory<cuda> takes device memory from and on which stream it zeroes and copies:
/// cudaMalloc, cudaFree and the legacy default stream unless a framework sharing the process
/// installs its own, once, before mxd allocates device memory (mxd_torch: PyTorch's caching
/// allocator and current stream, so that mxd's buffers come from torch's pool and its memsets
/// are ordered with torch's kernels). deallocate is called from destructors: it must not throw.
struct CudaMemoryHooks {
  void* (*allocate)(std::size_t bytes) = nullptr;
  void (*deallocate)(void* p) = nullptr;
  cudaStream_t (*stream)() = nullptr;
};
inline CudaMemoryHooks& cuda_memory_hooks() {
  static CudaMemoryHooks hooks;
  return hooks;
}

template <>
struct memory<cuda> {
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    if (auto* hook = cuda_memory_hooks().allocate) {
      p = hook(bytes);
      MXD_CHECK(p != nullptr, "device allocation of ", bytes, " bytes failed");
      return p;
    }
    MXD_CUDA_CHECK(cudaMalloc(&p, bytes));
    return p;
  }
  // Called from destructors: never throws (a failing cudaFree means the context is gone).
  static void deallocate(void* p) noexcept {
    if (!p) return;
    if (auto* hook = cuda_memory_hooks().deallocate) hook(p);
    else (void)cudaFree(p);
  }
  // On the legacy default stream (or the hooks' stream), named explicitly so that the order
  // with the blocking streams of Context<cuda> holds even in code compiled with per-thread
  // default streams.
  static cudaStream_t stream() {
    auto* hook = cuda_memory_hooks().stream;
    return hook ? hook() : cudaStreamLegacy;
  }
  static void zero(void* p, std::size_t bytes) {
    if (bytes) MXD_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream()));
  }
  static void copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes) MXD_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream()));
  }
  static void upload(void* dst, const void* host_src, std::size_t bytes) {
    if (!bytes) return;
    const cudaStream_t s = stream();
    MXD_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, s));
    MXD_CUDA_CHECK(cudaStreamSynchronize(s));  // host_src may go away after
  }
  // Waits for the blocking streams' queued work (the legacy stream orders after them), or for
  // the hooks' stream's.
  static void download(void* host_dst, const void* src, std::size_t bytes) {
    if (!bytes) return;
    const cudaStream_t s = stream();
    MXD_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, s));
    MXD_CUDA_CHECK(cudaStreamSynchronize(s));
  }
};

/// How cuBLAS computes float GEMMs (double GEMMs are always exact IEEE double):
///   fp32: IEEE float.
///   tf32: inputs rounded to TF32 (10-bit mantissa) on the tensor cores, float accumulation;
///         about 1e-3 relative error, several times faster.
///   bf16: inputs rounded to bf16 (7-bit mantissa) copies, float accumulation and output;
///         about 1e-2 relative error, the tensor cores' fastest float path. Tensors stay float.
enum class MathMode { fp32, tf32, bf16 };

namespace detail::cu {

// A position (row, column) as one key, row << 32 | column: keys order like row-major positions,
// so an atomicMin over them finds the lowest row, then the lowest column in it.
constexpr unsigned long long no_position = ~0ull;

// positions[0] keeps the first call's key since the host last looked, positions[1] is the
// current call's (reset for the next). One thread. (A template: no host stub to collide when
// several .cu files include this.)
template <class Key>
__global__ void merge_position_kernel(Key* positions) {
  if (positions[0] == no_position) positions[0] = positions[1];
  positions[1] = no_position;
}

}  // namespace detail::cu

/// The device's execution context: one stream that every primitive runs on, a cuBLAS handle
/// bound to it, the float GEMM math mode, a grow-only scratch buffer and the record of the
/// non-finite gate scores found on the device. The stream and handle are created on first use
/// on the then-current device, so constructing a Workspace needs no GPU; or they are someone
/// else's, given to use_stream (a framework's current stream and cuBLAS handle).
/// Move-only: it owns the stream and handle it created.
///
/// Kernels cannot throw: gate_topk records the first non-finite gate score it meets on the
/// device, and the next synchronize() throws mxd::Error naming it ("gate scores: non-finite
/// value at row R (expert N)", the CPU's message). loss() synchronizes before it returns, so
/// a training step stops there, before backward or the optimizer; code that reads results
/// with to_host should call synchronize() first.
template <>
class Context<cuda> {
public:
  MathMode math = MathMode::fp32;

  Context() = default;
  explicit Context(MathMode m) : math(m) {}
  ~Context() { release(); }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  Context(Context&& o) noexcept { swap(o); }
  Context& operator=(Context&& o) noexcept {
    Context tmp(std::move(o));
    swap(tmp);
    return *this;
  }

  cudaStream_t stream() {
    // A blocking stream: ordered with the legacy default stream that memory<cuda> uses.
    if (!has_stream_) {
      MXD_CUDA_CHECK(cudaStreamCreate(&stream_));
      has_stream_ = owns_stream_ = true;
    }
    return stream_;
  }

  /// Runs every later call on `stream` (0, the default stream, included) through `handle`,
  /// which must be bound to that stream; both belong to the caller, who keeps them alive while
  /// this context uses them, and are never destroyed here (e.g. PyTorch's current stream and
  /// cuBLAS handle). A stream and handle the context had created are released. Switching to
  /// another stream first waits for the old one, whose queued work may still read the scratch.
  /// memory<cuda> zeroes on the legacy default stream: with a non-blocking stream here, set
  /// CudaMemoryHooks::stream to it as well.
  void use_stream(cudaStream_t stream, cublasHandle_t handle) {
    MXD_CHECK(handle != nullptr, "Context<cuda>::use_stream: no cuBLAS handle given");
    if (has_stream_ && stream == stream_ && handle == cublas_ && !owns_stream_) return;
    if (has_stream_ && stream != stream_) synchronize();
    if (owns_stream_) {
      if (cublas_) (void)cublasDestroy(cublas_);
      (void)cudaStreamDestroy(stream_);
    }
    stream_ = stream;
    cublas_ = handle;
    has_stream_ = true;
    owns_stream_ = false;
  }

  cublasHandle_t cublas() {
    if (!cublas_) {
      MXD_CUBLAS_CHECK(cublasCreate(&cublas_));
      MXD_CUBLAS_CHECK(cublasSetStream(cublas_, stream()));
    }
    return cublas_;
  }

  /// A device buffer of at least `bytes`, valid until the next call; grows only. Primitives
  /// use it for temporaries within one call (stream order keeps consecutive uses apart).
  void* scratch(std::size_t bytes) {
    if (bytes > scratch_bytes_) {
      synchronize();  // the old buffer may still be read by queued kernels
      memory<cuda>::deallocate(scratch_);
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      scratch_ = memory<cuda>::allocate(bytes);
      scratch_bytes_ = bytes;
    }
    return scratch_;
  }

  /// Waits for everything queued on the stream; rethrows asynchronous kernel errors, then the
  /// first non-finite gate score that gate_topk found since the last synchronize().
  void synchronize() {
    if (!has_stream_) return;
    MXD_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (!check_pending_) return;
    check_pending_ = false;
    const unsigned long long key = *host_position_;
    if (key == detail::cu::no_position) return;
    // Clean again for the next calls (stream-ordered before them).
    MXD_CUDA_CHECK(cudaMemsetAsync(positions_, 0xff, sizeof(*positions_), stream_));
    throw Error(detail::concat("gate scores: non-finite value at row ", key >> 32, " (expert ",
                               key & 0xffffffffull, ")"));
  }

  /// For gate_topk: the device key (see detail::cu::no_position) its kernel lowers with
  /// atomicMin at each non-finite gate score. Pass it to one kernel, then call
  /// nonfinite_check_queued() right after.
  unsigned long long* nonfinite_position() {
    if (!host_position_) {
      MXD_CUDA_CHECK(cudaMallocHost(&host_position_, sizeof(*host_position_)));
      *host_position_ = detail::cu::no_position;
    }
    if (!positions_) {
      cudaStream_t s = stream();
      positions_ = static_cast<unsigned long long*>(memory<cuda>::allocate(2 * sizeof(*positions_)));
      MXD_CUDA_CHECK(cudaMemsetAsync(positions_, 0xff, 2 * sizeof(*positions_), s));
    }
    return positions_ + 1;
  }

  /// Queues the report of the kernel's key for synchronize(); the first call since the last
  /// synchronize() that found a non-finite score is the one reported.
  void nonfinite_check_queued() {
    cudaStream_t s = stream();
    MXD_CUDA_LAUNCH(detail::cu::merge_position_kernel<unsigned long long>, 1, 1, s, positions_);
    MXD_CUDA_CHECK(cudaMemcpyAsync(host_position_, positions_, sizeof(*positions_),
                                   cudaMemcpyDeviceToHost, s));
    check_pending_ = true;
  }

private:
  void release() noexcept {
    if (owns_stream_ && cublas_) (void)cublasDestroy(cublas_);
    if (owns_stream_) (void)cudaStreamDestroy(stream_);
    memory<cuda>::deallocate(scratch_);
    memory<cuda>::deallocate(positions_);
    if (host_position_) (void)cudaFreeHost(host_position_);
    cublas_ = nullptr;
    stream_ = nullptr;
    has_stream_ = owns_stream_ = false;
    scratch_ = nullptr;
    scratch_bytes_ = 0;
    positions_ = nullptr;
    host_position_ = nullptr;
    check_pending_ = false;
  }
  void swap(Context& o) noexcept {
    std::swap(math, o.math);
    std::swap(stream_, o.stream_);
    std::swap(cublas_, o.cublas_);
    std::swap(has_stream_, o.has_stream_);
    std::swap(owns_stream_, o.owns_stream_);
    std::swap(scratch_, o.scratch_);
    std::swap(scratch_bytes_, o.scratch_bytes_);
    std::swap(positions_, o.positions_);
    std::swap(host_position_, o.host_position_);
    std::swap(check_pending_, o.check_pending_);
  }

  cudaStream_t stream_ = nullptr;  // 0 is a stream too (the default one): has_stream_ tells
  cublasHandle_t cublas_ = nullptr;
  bool has_stream_ = false;
  bool owns_stream_ = false;  // created here (else use_stream's, never destroyed here)
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
  // Non-finite gate scores: [2] device keys (first since the host looked, current call),
  // their pinned host copy, and whether a copy was queued since the last synchronize().
  unsigned long long* positions_ = nullptr;
  unsigned long long* host_position_ = nullptr;
  bool check_pending_ = false;
};

namespace detail {

// Copies a [rows, cols] matrix between views with their own leading dimensions, on the legacy
// default stream (after all queued work of the blocking streams), and waits for it.
template <class T>
void copy_matrix(T* dst, index_t dst_ld, const T* src, index_t src_ld, index_t rows, index_t cols,
                 cudaMemcpyKind kind) {
  if (rows == 0 || cols == 0) return;
  MXD_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_ld * sizeof(T), src, src_ld * sizeof(T),
                                   cols * sizeof(T), rows, kind, cudaStreamLegacy));
  MXD_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
}

}  // namespace detail

/// Copies a host matrix into a device matrix of the same shape (synchronous).
/// src: [R, C] host, dst: [R, C] device.
template <class T>
void copy_to_device(InView<T, cpu> src, View<T, cuda> dst) {
  check_shape(dst, src.rows, src.cols, "copy_to_device: destination");
  detail::copy_matrix(dst.data, dst.ld, src.data, src.ld, src.rows, src.cols,
                      cudaMemcpyHostToDevice);
}

/// Copies a device matrix into a host matrix of the same shape (synchronous: waits for the
/// legacy default stream, hence for every blocking stream's queued work).
/// src: [R, C] device, dst: [R, C] host.
template <class T>
void copy_to_host(InView<T, cuda> src, View<T, cpu> dst) {
  check_shape(dst, src.rows, src.cols, "copy_to_host: destination");
  detail::copy_matrix(dst.data, dst.ld, src.data, src.ld, src.rows, src.cols,
                      cudaMemcpyDeviceToHost);
}

/// A device copy of a host tensor.
template <class T>
Tensor<T, cuda> to_device(const Tensor<T, cpu>& h) {
  Tensor<T, cuda> d;
  d.resize(h.rows(), h.cols(), false);
  copy_to_device<T>(h.view(), d.view());
  return d;
}

/// A host copy of a device tensor.
template <class T>
Tensor<T, cpu> to_host(const Tensor<T, cuda>& d) {
  Tensor<T, cpu> h;
  h.resize(d.rows(), d.cols(), false);
  copy_to_host<T>(d.view(), h.view());
  return h;
}

namespace detail {

// Copies every tensor of one parameter set (Params, TranscoderParams: anything with for_each
// over Tensor<T, Device>) into another of the same config on the other device.
template <class T, class From, class To, template <class, class> class Set>
void copy_set(const Set<T, From>& src, Set<T, To>& dst) {
  std::vector<const Tensor<T, From>*> tensors;
  src.for_each([&](const char*, const Tensor<T, From>& t) { tensors.push_back(&t); });
  std::size_t n = 0;
  dst.for_each([&](const char* name, Tensor<T, To>& t) {
    MXD_CHECK(n < tensors.size(), "copy: the destination has more tensors than the source at ", name);
    const Tensor<T, From>& s = *tensors[n++];
    if constexpr (std::is_same_v<To, cuda>) copy_to_device<T>(s.view(), t.view());
    else copy_to_host<T>(s.view(), t.view());
  });
}

// The set `src` on device To.
template <class To, class T, class From, template <class, class> class Set>
Set<T, To> set_on(const Set<T, From>& src) {
  Set<T, To> dst(src.config);
  copy_set(src, dst);
  return dst;
}

// The optimizer state `src` on device To, for `params` there.
template <class To, class T, class From, template <class, class> class Set>
AdamW<T, To, Set<T, To>> optimizer_on(const AdamW<T, From, Set<T, From>>& src,
                                      const Set<T, To>& params) {
  AdamW<T, To, Set<T, To>> dst(params, src.config());
  dst.t = src.t;
  copy_set(src.m, dst.m);
  copy_set(src.v, dst.v);
  return dst;
}

}  // namespace detail

/// Device copy of a host parameter set (Params, Grads or TranscoderParams): same config.
template <class T, template <class, class> class Set>
Set<T, cuda> to_device(const Set<T, cpu>& h) {
  return detail::set_on<cuda>(h);
}

/// Host copy of a device parameter set.
template <class T, template <class, class> class Set>
Set<T, cpu> to_host(const Set<T, cuda>& d) {
  return detail::set_on<cpu>(d);
}

/// Device copy of a host optimizer's state (moments and step count), for `params` on the device.
template <class T, template <class, class> class Set>
AdamW<T, cuda, Set<T, cuda>> to_device(const AdamW<T, cpu, Set<T, cpu>>& h,
                                       const Set<T, cuda>& params) {
  return detail::optimizer_on<cuda>(h, params);
}

/// Host copy of a device optimizer's state, for `params` on the host (e.g. save_checkpoint).
template <class T, template <class, class> class Set>
AdamW<T, cpu, Set<T, cpu>> to_host(const AdamW<T, cuda, Set<T, cuda>>& d,
                                   const Set<T, cpu>& params) {
  return detail::optimizer_on<cpu>(d, params);
}

}  // namespace mxd
