// SPDX-License-Identifier: MIT
/// @file device.hpp
/// @brief Device tags and MXD_HOST_DEVICE, so per-element math is written once for CPU and GPU.
#pragma once

#if defined(__CUDACC__)
#define MXD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MXD_HOST_DEVICE inline
#endif

/// MXD_HOST_DEVICE that the host compiler always inlines (as nvcc's __forceinline__ does), for
/// bodies too large for its own judgement that the host loop must still have in one piece.
#if defined(__CUDACC__) || !defined(__GNUC__)
#define MXD_HOST_DEVICE_INLINE MXD_HOST_DEVICE
#else
#define MXD_HOST_DEVICE_INLINE inline __attribute__((always_inline))
#endif

namespace mxd {

/// Host memory, mxd's own GEMM (backend/gemm.hpp) and worker threads (backend/thread_pool.hpp).
struct cpu {};
/// Device memory, cuBLAS and CUDA kernels (include <mxd/cuda.cuh>).
struct cuda {};

/// Per-device memory management; specialised for each device tag.
template <class Device>
struct memory;

/// Per-device execution context (threads, streams, handles); specialised for each device tag.
template <class Device>
struct Context;

}  // namespace mxd
