// SPDX-License-Identifier: MIT
/// @file mxd.hpp
/// @brief Umbrella header for CPU users: the layer, its Eigen backend and the losses.
/// Never pulls in CUDA; GPU users include <mxd/cuda.cuh> as well.
#pragma once

#include "config.hpp"
#include "error.hpp"
#include "tensor.hpp"
#include "params.hpp"
#include "workspace.hpp"
#include "layer.hpp"
#include "backend/cpu.hpp"
#include "loss.hpp"
#include "optim.hpp"
