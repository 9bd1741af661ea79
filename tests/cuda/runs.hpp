// SPDX-License-Identifier: MIT
// Host-side entry points into the CUDA backend. runs.cu (nvcc) instantiates them; the test
// files that call them, and the CPU reference they compare with, stay plain C++ (g++, Eigen).
// Every function takes and returns host tensors and copies to and from the device itself.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/loss.hpp>
#include <mxd/optim.hpp>
#include <mxd/params.hpp>
#include <mxd/steering.hpp>
#include <mxd/train/step.hpp>
#include <mxd/tensor.hpp>

namespace mxd_cuda_test {

using mxd::index_t;
using mxd::Tensor;

/// Number of visible CUDA devices: mxd::cuda_device_count (0 without a GPU or driver; throws
/// mxd::Error naming the CUDA error for a broken driver).
int device_count();

/// mxd::cuda_device_count's verdict for a cudaGetDeviceCount result `status` (a cudaError_t),
/// `count` and cudaDriverGetVersion's `driver_version`: the count, or mxd::Error.
int device_count_verdict(int status, int count, int driver_version);

/// The message of the mxd::Error thrown by an allocation no device can satisfy.
std::string impossible_allocation_error();

/// One forward and backward of the layer on the device, everything copied back.
template <class T>
struct LayerResult {
  Tensor<T> y, dx;
  mxd::Grads<T> g;
  Tensor<std::int32_t> idx;  // [B, k (+ edits)]
  Tensor<T> val;             // gate values
  Tensor<T> coef;            // steered coefficients (steered runs only)
};

struct LayerOptions {
  const mxd::Steering* steering = nullptr;
  bool tf32 = false;
  bool bf16 = false;               // MathMode::bf16 (float only)
  bool accumulate_twice = false;  // backward Overwrite, then again with Accumulate
};

/// x: [B, I], dy: [B, O].
template <class T>
LayerResult<T> layer(const mxd::Params<T>& p, const Tensor<T>& x, const Tensor<T>& dy,
                     const LayerOptions& options = {});

/// One forward and backward of a transcoder on the device. x: [B, I], dy: [B, O].
template <class T>
struct TranscoderResult {
  Tensor<T> y, dx;
  mxd::TranscoderParams<T> g;
};
template <class T>
TranscoderResult<T> transcoder(const mxd::TranscoderParams<T>& p, const Tensor<T>& x,
                               const Tensor<T>& dy);

/// train::step on the device, once per batch; then params, optimizer and dead-unit state and
/// the per-step losses (and AuxK losses) copied back. inputs, targets: one [B, I] / [B, O]
/// batch per step.
template <class T>
struct TrainResult {
  mxd::Params<T> p;
  mxd::AdamW<T> opt;
  std::vector<double> losses, aux_losses;
  mxd::train::DeadUnits dead;
};
template <class T>
TrainResult<T> train(const mxd::Params<T>& p, const std::vector<Tensor<T>>& inputs,
                     const std::vector<Tensor<T>>& targets, const mxd::AdamWConfig& oc,
                     const mxd::train::StepOptions& options);

/// Device loss; dy is resized to y's shape and receives dL/dy. y, t: [B, O].
template <class T>
double loss(mxd::Loss kind, const Tensor<T>& y, const Tensor<T>& t, Tensor<T>& dy);

/// backend<cuda>::gate_topk. scores: [B, N] (biased, and with relu relu'd, in place), b_gate:
/// [1, N] -> idx, val: [B, k + pad], of which gate_topk writes the views of the first k
/// columns (leading dimension k + pad); the `pad` columns after them hold their fill values -7.
template <class T>
void gate_topk(Tensor<T>& scores, const Tensor<T>& b_gate, index_t k, Tensor<std::int32_t>& idx,
               Tensor<T>& val, index_t pad = 0, bool relu = true);

/// backend<cuda>::gate_topk on each of `batches` ([B, N] gate scores) in turn, on one context.
/// With `sync_each`, synchronize() after each call: one message per call, "" where it threw
/// nothing. Without, one synchronize() after all: one message.
template <class T>
std::vector<std::string> gate_topk_errors(const std::vector<Tensor<T>>& batches,
                                          const Tensor<T>& b_gate, index_t k, bool sync_each);

/// backend<cuda>::group_by_expert. idx: [B, k] -> order: [1, B k], offsets: [1, N + 1].
void group_by_expert(const Tensor<std::int32_t>& idx, index_t N, Tensor<std::int32_t>& order,
                     Tensor<std::int32_t>& offsets);

/// mxd::MathMode, for the host compiler.
enum class Math { fp32, tf32, bf16 };

/// backend<cuda>::gemm on the sub-matrix views [rows, cols] of A, B and C at their top-left
/// (so the leading dimensions are the full tensors' widths), float GEMMs in `math`. C is
/// updated in place.
template <class T>
void gemm(bool trans_a, bool trans_b, T alpha, const Tensor<T>& A, index_t a_rows, index_t a_cols,
          const Tensor<T>& B, index_t b_rows, index_t b_cols, T beta, Tensor<T>& C,
          index_t c_rows, index_t c_cols, Math math = Math::fp32);

/// norm_dec's kernels: backend<cuda>::remove_parallel_rows(C, g) and normalize_rows(C), both
/// in place. C, g: [N, O].
template <class T>
void norm_dec(Tensor<T>& C, Tensor<T>& g);

/// train::clip_grad_norm on a device copy of the transcoder gradients g (copied back);
/// returns the norm before clipping.
template <class T>
double clip_grad_norm(mxd::TranscoderParams<T>& g, double max_norm);

// backend<cuda>::find_non_finite on a device copy of v, and the message of a GPU AdamW step
// whose gradients are `g` ("" if it passed).
template <class T>
index_t find_non_finite(const Tensor<T>& v);
template <class T>
std::string adamw_step_error(const mxd::Params<T>& p, const mxd::Params<T>& g);

/// to_host(to_device(p)) and to_host(to_device(opt)).
template <class T>
mxd::Params<T> round_trip(const mxd::Params<T>& p);
template <class T>
mxd::AdamW<T> round_trip(const mxd::AdamW<T>& opt, const mxd::Params<T>& p);

}  // namespace mxd_cuda_test
