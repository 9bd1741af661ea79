// SPDX-License-Identifier: MIT
/// @file workspace.hpp
/// @brief Workspace<T, Device>: the forward cache that backward reads, and backward's scratch.
///
/// One workspace serves any number of steps: buffers grow to the largest batch seen and are
/// then reused, so a training loop allocates nothing after its first step.
#pragma once

#include <cstdint>

#include "config.hpp"
#include "tensor.hpp"

namespace mxd {

// B = rows of the batch, I = d_in, H = d_hidden, O = d_out, N = n_experts, k = top-k.
template <class T, class Device = cpu>
struct Workspace {
  Context<Device> ctx;  // threads (cpu) or stream and handles (cuda)

  // Forward cache, filled by forward(), read by backward().
  index_t batch = 0;                       // B of the last forward
  Tensor<T, Device> hpre;                  // [B, H] x E + b_enc
  Tensor<T, Device> g;                     // [B, H] x W_glu^T + b_glu (glu only)
  Tensor<T, Device> z;                     // [B, H] act(hpre) (* g)
  Tensor<T, Device> u;                     // [B, O] z D
  Tensor<T, Device> v;                     // [B, O] sum_j a_j c_{idx_j}
  Tensor<T, Device> scores;                // [B, N] relu(x G^T + b_gate): the only [B, N] buffer
  Tensor<std::int32_t, Device> topk_idx;   // [B, k] selected experts, best first
  Tensor<T, Device> topk_val;              // [B, k] their coefficients a (0 where not positive)
  // With steering the selection has k + edits columns: topk_val then holds the gate values
  // (0 where an edit cuts the gate's gradient) and coef the coefficients actually mixed.
  bool steered = false;
  Tensor<T, Device> coef;                  // [B, k + edits] (steered forwards only)

  // Backward scratch.
  Tensor<T, Device> du, dv;                // [B, O]
  Tensor<T, Device> dz, dhpre, dg;         // [B, H]
  Tensor<T, Device> ds;                    // [B, k] dL/d(selected gate scores)
  Tensor<std::int32_t, Device> order;      // [1, B k] (row, slot) pairs grouped by expert
  Tensor<std::int32_t, Device> offsets;    // [1, N + 1] start of each expert's group in order

  Workspace() = default;
  explicit Workspace(Context<Device> c) : ctx(std::move(c)) {}

  /// Shapes the forward cache for a batch of B rows of `cfg` with `edits` steering edits
  /// (allocating only to grow).
  void prepare_forward(const Config& cfg, index_t B, index_t edits = 0) {
    const index_t H = cfg.d_hidden, O = cfg.d_out;
    batch = B;
    hpre.resize(B, H, false);
    g.resize(cfg.glu ? B : 0, H, false);
    z.resize(B, H, false);
    u.resize(B, O, false);
    v.resize(B, O, false);
    scores.resize(B, cfg.n_experts, false);
    topk_idx.resize(B, cfg.k + edits, false);
    topk_val.resize(B, cfg.k + edits, false);
    steered = edits > 0;
    coef.resize(steered ? B : 0, cfg.k + edits, false);
  }

  /// The coefficients forward mixed the experts with: [B, k (+ edits)].
  View<T, Device> coefficients() { return steered ? coef.view() : topk_val.view(); }

  /// Shapes backward's scratch for the cached batch.
  void prepare_backward(const Config& cfg) {
    const index_t B = batch, H = cfg.d_hidden, O = cfg.d_out;
    du.resize(B, O, false);
    dv.resize(B, O, false);
    dz.resize(B, H, false);
    dhpre.resize(B, H, false);
    dg.resize(cfg.glu ? B : 0, H, false);
    ds.resize(B, topk_idx.cols(), false);
    order.resize(1, B * topk_idx.cols(), false);
    offsets.resize(1, cfg.n_experts + 1, false);
  }

  /// Bytes currently held by the workspace's buffers.
  std::size_t bytes() const {
    return hpre.bytes() + g.bytes() + z.bytes() + u.bytes() + v.bytes() + scores.bytes() +
           topk_idx.bytes() + topk_val.bytes() + coef.bytes() + du.bytes() + dv.bytes() + dz.bytes() +
           dhpre.bytes() + dg.bytes() + ds.bytes() + order.bytes() + offsets.bytes();
  }
};

}  // namespace mxd
