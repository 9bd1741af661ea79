// SPDX-License-Identifier: MIT
// The mxd tool's GPU side, declared for the plain C++ subcommands. CUDA builds define it in
// cuda.cu; CPU-only builds link no_cuda.cpp, whose functions throw mxd::Error saying the build
// has no CUDA backend. Everything here takes host tensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/optim.hpp>
#include <mxd/params.hpp>
#include <mxd/train/step.hpp>

namespace mxd::cli {

/// Throws mxd::Error unless this build has the CUDA backend and a CUDA device is visible.
void require_cuda();

/// A model trained on the GPU (Set = Params for an MxD, TranscoderParams for a baseline): a
/// train::Trainer on the device, whose parameters, gradients, optimizer and dead-unit state
/// stay there; batches go in, losses and predictions come out, and the state comes back when
/// it is saved.
template <class T, template <class, class> class Set>
class DeviceModel {
public:
  virtual ~DeviceModel() = default;
  /// train::step on the batch (returns the loss before the update). x: [B, I], target: [B, O].
  virtual double train_step(const Tensor<T>& x, const Tensor<T>& target) = 0;
  /// y = model(x) with the selection. x: [B, I] -> y: [B, O], idx, val: [B, k].
  virtual void predict(const Tensor<T>& x, Tensor<T>& y, Tensor<std::int32_t>& idx,
                       Tensor<T>& val) = 0;
  /// Copies parameters, optimizer and dead-unit state back into host ones of the same config.
  virtual void download(Set<T, cpu>& p, AdamW<T, cpu, Set<T, cpu>>& opt, train::DeadUnits& dead) = 0;
};

/// A host model's state (parameters, AdamW, dead units) and step options on the GPU; `math`
/// is how float GEMMs run: "fp32", "tf32" or "bf16" (mxd::MathMode). CPU-only builds throw
/// mxd::Error saying so.
template <class T, template <class, class> class Set>
std::unique_ptr<DeviceModel<T, Set>> make_cuda_model(const Set<T, cpu>& p,
                                                     const AdamW<T, cpu, Set<T, cpu>>& opt,
                                                     const train::DeadUnits& dead,
                                                     const train::StepOptions& options,
                                                     const std::string& math);

/// The layer and batch that `mxd bench` times (host copies).
template <class T>
struct BenchInputs {
  Params<T> p;
  Tensor<T> x, dy;  // [B, I], [B, O]
};

/// Medians of GPU forward, backward and step (forward + backward + AdamW) times of `in`, from
/// CUDA events around each phase after `warmup` iterations.
/// CPU-only builds throw mxd::Error saying so.
struct CudaTimings {
  double forward_ms, backward_ms, step_ms;
  std::size_t workspace_bytes;
  index_t tile_rows;  // rows of gate scores held at once
  std::string device_name;
};
template <class T>
CudaTimings bench_cuda(const Params<T>& p, const Tensor<T>& x, const Tensor<T>& dy, int iters,
                       int warmup, const std::string& math, index_t tile_rows, bool verbose);

// The explicit instantiations that cuda.cu and no_cuda.cpp both provide.
#define MXD_CLI_CUDA_MODEL(T, S)                                                                    \
  template std::unique_ptr<DeviceModel<T, S>> make_cuda_model<T, S>(                                \
      const S<T, cpu>&, const AdamW<T, cpu, S<T, cpu>>&, const train::DeadUnits&,                   \
      const train::StepOptions&, const std::string&);
#define MXD_CLI_CUDA_INSTANTIATIONS                                                                 \
  MXD_CLI_CUDA_MODEL(float, Params)                                                                 \
  MXD_CLI_CUDA_MODEL(double, Params)                                                                \
  MXD_CLI_CUDA_MODEL(float, TranscoderParams)                                                       \
  MXD_CLI_CUDA_MODEL(double, TranscoderParams)                                                      \
  template CudaTimings bench_cuda<float>(const Params<float>&, const Tensor<float>&,                  \
                                         const Tensor<float>&, int, int, const std::string&, index_t, bool);   \
  template CudaTimings bench_cuda<double>(const Params<double>&, const Tensor<double>&,               \
                                          const Tensor<double>&, int, int, const std::string&, index_t, bool);

}  // namespace mxd::cli
