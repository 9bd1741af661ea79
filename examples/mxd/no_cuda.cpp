// SPDX-License-Identifier: MIT
// The mxd tool's GPU side in a build without the CUDA backend: every entry point of cuda.hpp
// throws mxd::Error saying how to get one.
#include "cuda.hpp"

namespace mxd::cli {

namespace {
[[noreturn]] void no_cuda() {
  throw Error("--device cuda: CUDA backend not built (configure with -DMXD_CUDA=ON; needs nvcc)");
}
}  // namespace

void require_cuda() { no_cuda(); }

template <class T, template <class, class> class Set>
std::unique_ptr<DeviceModel<T, Set>> make_cuda_model(const Set<T, cpu>&,
                                                     const AdamW<T, cpu, Set<T, cpu>>&,
                                                     const train::DeadUnits&,
                                                     const train::StepOptions&, const std::string&) {
  no_cuda();
}

template <class T>
CudaTimings bench_cuda(const Params<T>&, const Tensor<T>&, const Tensor<T>&, int, int,
                       const std::string&, index_t, bool) {
  no_cuda();
}

MXD_CLI_CUDA_INSTANTIATIONS

}  // namespace mxd::cli
