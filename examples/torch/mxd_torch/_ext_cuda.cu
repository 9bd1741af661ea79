// SPDX-License-Identifier: MIT
// mxd_torch's CUDA half, compiled by nvcc in builds with CUDA (setup.py: MXD_TORCH_CUDA): the
// adapter (adapter.h) over backend<cuda>, for tensors on a GPU. _ext.cpp calls the functions
// declared in adapter.h's namespace gpu; nothing here touches Python.
//
// Every call runs on torch's current stream of the parameters' device, through torch's cuBLAS
// handle for it (Context<cuda>::use_stream), so it is ordered with the torch kernels around
// it as torch's own ops are. Device memory (mxd's workspaces and scratch, AdamW's moments)
// comes from torch's caching allocator (mxd::CudaMemoryHooks), parameters, inputs and outputs
// are torch's tensors, borrowed in place: no cudaMalloc per call and no copies.
//
// Compiled, not yet run on a GPU: tests/torch/test_mxd_torch_cuda.py is what checks it there.
#include <mxd/cuda.cuh>

#include "adapter.h"

#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace mxd_torch::gpu {
namespace {

mxd::MathMode math_mode(const std::string& math) {
  if (math == "fp32") return mxd::MathMode::fp32;
  if (math == "tf32") return mxd::MathMode::tf32;
  MXD_CHECK(math == "bf16", "math mode '", math, "': expected fp32, tf32 or bf16");
  return mxd::MathMode::bf16;
}

// One call on a GPU: that device made current, torch's current stream there and torch's
// cuBLAS handle (bound to that stream by getCurrentCUDABlasHandle; its workspace is torch's).
class Call {
public:
  explicit Call(const at::Device& device)
      : guard_(device),
        stream_(c10::cuda::getCurrentCUDAStream(device.index()).stream()),
        handle_(at::cuda::getCurrentCUDABlasHandle()),
        device_(device.index()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MXD_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
    MXD_CHECK(capture == cudaStreamCaptureStatusNone,
              "mxd_torch cannot run inside CUDA graph capture (a forward waits for its stream to "
              "report non-finite gate scores): leave mxd layers out of captured regions "
              "(torch.compile mode='reduce-overhead' does, through the cudagraph_unsafe tag)");
  }
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

  // Points ctx at this call's stream and handle, with the float GEMMs' math mode.
  void bind(mxd::Context<mxd::cuda>& ctx, const std::string& math) const {
    ctx.use_stream(stream_, handle_);
    ctx.math = math_mode(math);
  }

  // The workspace of type W of this thread for this device and stream, kept from call to call
  // (its scratch grows to the largest call, then stays, in torch's allocator). One per stream:
  // its buffers are only ever used in the order of one stream, so calls on other streams
  // cannot overwrite them while queued work still reads them.
  template <class W>
  W& workspace() const {
    thread_local std::map<std::pair<int, cudaStream_t>, std::unique_ptr<W>> kept;
    std::unique_ptr<W>& ws = kept[{device_, stream_}];
    if (!ws) ws = std::make_unique<W>();
    return *ws;
  }

private:
  c10::cuda::CUDAGuard guard_;  // first: the members below are the device's
  cudaStream_t stream_;
  cublasHandle_t handle_;
  int device_;
};

// mxd::CudaMemoryHooks to torch's caching allocator and current stream.
void* allocate(std::size_t bytes) { return c10::cuda::CUDACachingAllocator::raw_alloc(bytes); }
void deallocate(void* p) {
  try {
    c10::cuda::CUDACachingAllocator::raw_delete(p);
  } catch (...) {  // from destructors, at exit: nothing to be done
  }
}
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace

void install_memory_hooks() {
  mxd::CudaMemoryHooks& hooks = mxd::cuda_memory_hooks();
  hooks.allocate = &allocate;
  hooks.deallocate = &deallocate;
  hooks.stream = &current_stream;
}

// f(T{}, workspace) with the parameters' dtype T and this thread's workspace for their device
// and torch's current stream, bound to that stream and `math`.
template <class Config, class F>
decltype(auto) on_device(const std::vector<at::Tensor>& params, const std::string& math, F&& f) {
  return by_dtype(first(params), "W_enc", [&](auto zero) -> decltype(auto) {
    using W = typename Model<Config>::template Workspace<decltype(zero), mxd::cuda>;
    const Call call(first(params).device());
    W& ws = call.workspace<W>();
    call.bind(ws.ctx, math);
    return f(zero, ws);
  });
}

template <class Config>
std::pair<at::Tensor, std::vector<at::Tensor>> forward(const Config& c,
                                                       const std::vector<at::Tensor>& params,
                                                       const at::Tensor& x,
                                                       const mxd::Steering* steering, index_t K,
                                                       const std::string& math) {
  return on_device<Config>(params, math, [&](auto zero, auto& ws) {
    using T = decltype(zero);
    auto out = forward_saved<Config, T, mxd::cuda>(c, params, x, ws, steering, K);
    // Kernels cannot throw: a non-finite gate score (found by gate_topk) is reported here,
    // for this call, as the CPU reports it at once.
    ws.ctx.synchronize();
    return out;
  });
}

template <class Config>
std::pair<at::Tensor, std::vector<at::Tensor>> backward(
    const Config& c, const std::vector<at::Tensor>& params, const at::Tensor& x, const at::Tensor& dy,
    const std::vector<at::Tensor>& saved, bool need_dx, const std::string& math,
    GradBuffers* buffers, const std::vector<bool>& reuse_ok) {
  return on_device<Config>(params, math, [&](auto zero, auto& ws) {
    using T = decltype(zero);
    return backward_saved<Config, T, mxd::cuda>(c, params, x, dy, saved, ws, need_dx, buffers,
                                                reuse_ok);
  });
}

template <class Config>
std::unique_ptr<Optimizer> adamw(const Config& c, const std::vector<at::Tensor>& params,
                                 const mxd::AdamWConfig& oc) {
  return by_dtype(first(params), "W_enc", [&](auto zero) -> std::unique_ptr<Optimizer> {
    using T = decltype(zero);
    using Set = typename Model<Config>::template Params<T, mxd::cuda>;
    const at::Device device = first(params).device();
    // Each step on the device's current stream, which stays current while the step runs.
    auto prepare = [device](mxd::Context<mxd::cuda>& ctx, int) {
      auto call = std::make_unique<Call>(device);
      call->bind(ctx, "fp32");
      return call;
    };
    // The moments are allocated and zeroed on the parameters' device and its current stream.
    const c10::cuda::CUDAGuard guard(device);
    return std::make_unique<OptimizerT<Set, Config, decltype(prepare)>>(c, params, oc, prepare);
  });
}

#define MXD_TORCH_INSTANTIATE(Config)                                                            \
  template std::pair<at::Tensor, std::vector<at::Tensor>> forward<Config>(                      \
      const Config&, const std::vector<at::Tensor>&, const at::Tensor&, const mxd::Steering*,   \
      index_t, const std::string&);                                                             \
  template std::pair<at::Tensor, std::vector<at::Tensor>> backward<Config>(                     \
      const Config&, const std::vector<at::Tensor>&, const at::Tensor&, const at::Tensor&,      \
      const std::vector<at::Tensor>&, bool, const std::string&, GradBuffers*,                   \
      const std::vector<bool>&);                                                                \
  template std::unique_ptr<Optimizer> adamw<Config>(const Config&, const std::vector<at::Tensor>&, \
                                                    const mxd::AdamWConfig&);
MXD_TORCH_INSTANTIATE(mxd::Config)
MXD_TORCH_INSTANTIATE(mxd::TranscoderConfig)
#undef MXD_TORCH_INSTANTIATE

}  // namespace mxd_torch::gpu
