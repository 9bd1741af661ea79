// SPDX-License-Identifier: MIT
// A second translation unit of mxd_cuda_tests that includes every CUDA header, as a project
// with several .cu files does: a kernel defined in a header that is not a template (its host
// stub) or a function that is not inline would then be defined twice, and the link fails.
#include <mxd/cuda.cuh>
#include <mxd/parallel/cuda.cuh>
#include <mxd/train/aux_loss.cuh>
#include <mxd/train/step.hpp>
