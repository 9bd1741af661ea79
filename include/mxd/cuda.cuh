// SPDX-License-Identifier: MIT
/// @file cuda.cuh
/// @brief Umbrella header for CUDA users (compile with nvcc, link mxd::cuda): the layer with
/// backend<cuda>, device memory and copies, device losses, steering and AdamW.
///
/// Switching a training loop from the CPU is a change of device tag:
///
///     mxd::Params<float, mxd::cuda> p = mxd::to_device(host_params);
///     mxd::Grads<float, mxd::cuda> g(p.config);
///     mxd::Workspace<float, mxd::cuda> ws;            // ws.ctx.math = mxd::MathMode::tf32 opts in
///     mxd::AdamW<float, mxd::cuda> opt(p, adamw_config);
///     mxd::forward(p, x, y, ws);                      // x, y: device tensors
///     double L = mxd::loss(ws.ctx, mxd::Loss::nmse_ref, y, target, dy);
///     mxd::backward(p, x, dy, ws, g);
///     opt.step(p, g, ws.ctx);
///
/// The CUDA headers declare a namespace ::cuda of their own: after `using namespace mxd;`
/// write `mxd::cuda`, or add `using mxd::cuda;`.
///
/// Never pulls in Eigen; a file may include both this and <mxd/mxd.hpp> to use both devices.
#pragma once

#include "config.hpp"
#include "error.hpp"
#include "tensor.hpp"
#include "params.hpp"
#include "workspace.hpp"
#include "layer.hpp"
#include "loss.hpp"
#include "optim.hpp"
#include "steering.hpp"
#include "backend/cuda/runtime.cuh"
#include "backend/cuda.cuh"
#include "backend/cuda/loss.cuh"
#include "backend/cuda/steering.cuh"
