// SPDX-License-Identifier: MIT
/// @file workspace.hpp
/// @brief Workspace<T, Device>: the forward cache that backward reads, and backward's scratch.
///
/// One workspace serves any number of steps: buffers grow to the largest batch seen and are
/// then reused, so a training loop allocates nothing after its first step.
///
/// Nothing in it grows with B x N: the gate scores exist for one row tile at a time (forward
/// selects the top-k of a tile before scoring the next), so the workspace is
/// O(tile x N + B x (I + H + O + k)). infer() tiles everything and keeps no backward cache.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "config.hpp"
#include "tensor.hpp"

namespace mxd {

/// Row tiles are multiples of this many rows: tall enough that packing the gate matrix G once
/// per tile costs little beside the tile's GEMM. Results do not depend on the tile: the host
/// GEMM computes each element the same way in any tile (backend/gemm.hpp).
inline constexpr index_t tile_row_multiple = 128;

// B = rows of the batch, I = d_in, H = d_hidden, O = d_out, N = n_experts, k = top-k.
template <class T, class Device = cpu>
struct Workspace {
  Context<Device> ctx;  // threads (cpu) or stream and handles (cuda)

  /// Rows per tile of gate scores (and of everything in infer()); 0 = as many as fit
  /// auto_tile_bytes (at least tile_row_multiple). Rounded up to a multiple of
  /// tile_row_multiple; results do not depend on it.
  index_t tile_rows = 0;
  // On the host a tile of scores that stays in cache for the top-k pass; on a GPU, tiles tall
  // enough to keep the gate GEMM efficient (at GPT-2 sizes 128-row tiles doubled the forward).
  static constexpr std::size_t auto_tile_bytes =
      std::is_same_v<Device, cpu> ? std::size_t(16) << 20 : std::size_t(512) << 20;

  // Forward cache, filled by forward(), read by backward().
  index_t batch = 0;                       // B of the last forward
  Tensor<T, Device> hpre;                  // [B, H] x E + b_enc
  Tensor<T, Device> g;                     // [B, H] x W_glu^T + b_glu (glu only)
  Tensor<T, Device> z;                     // [B, H] act(hpre) (* g)
  Tensor<T, Device> u;                     // [B, O] z D
  Tensor<T, Device> v;                     // [B, O] sum_j a_j c_{idx_j}
  Tensor<T, Device> scores;                // [tile, N] relu(x G^T + b_gate) of one row tile
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

  /// The tile height for a batch of B rows when each row of a tile needs `row_bytes`: the
  /// automatic one stays within auto_tile_bytes, except that no tile is shorter than
  /// tile_row_multiple rows.
  index_t tile_for(index_t B, std::size_t row_bytes) const {
    const index_t m = tile_row_multiple;
    const index_t t = tile_rows > 0 ? (tile_rows + m - 1) / m * m
                                    : std::max<index_t>(static_cast<index_t>(
                                          auto_tile_bytes / std::max<std::size_t>(row_bytes, 1) / m), 1) * m;
    return std::min(t, B);
  }

  /// Shapes the forward cache for a batch of B rows of `cfg` with `edits` steering edits
  /// (allocating only to grow). Returns the gate-score tile height.
  index_t prepare_forward(const Config& cfg, index_t B, index_t edits = 0) {
    batch = B;
    const index_t tile = tile_for(B, std::size_t(cfg.n_experts) * sizeof(T));
    shape_rows(cfg, B, tile, edits);
    return tile;
  }

  /// Shapes every buffer for one tile of infer() over a batch of B rows, and forgets any
  /// cached forward (infer keeps none). Returns the tile height.
  index_t prepare_infer(const Config& cfg, index_t B, index_t edits = 0) {
    batch = 0;
    const index_t per_row = cfg.n_experts + 3 * cfg.d_hidden + 2 * cfg.d_out + 2 * (cfg.k + edits);
    const index_t tile = tile_for(B, std::size_t(per_row) * sizeof(T));
    shape_rows(cfg, tile, tile, edits);
    return tile;
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

private:
  // The forward buffers for `rows` rows and a gate-score tile of `tile` rows.
  void shape_rows(const Config& cfg, index_t rows, index_t tile, index_t edits) {
    const index_t H = cfg.d_hidden, O = cfg.d_out;
    hpre.resize(rows, H, false);
    g.resize(cfg.glu ? rows : 0, H, false);
    z.resize(rows, H, false);
    u.resize(rows, O, false);
    v.resize(rows, O, false);
    scores.resize(tile, cfg.n_experts, false);
    topk_idx.resize(rows, cfg.k + edits, false);
    topk_val.resize(rows, cfg.k + edits, false);
    steered = edits > 0;
    coef.resize(steered ? rows : 0, cfg.k + edits, false);
  }
};

}  // namespace mxd
