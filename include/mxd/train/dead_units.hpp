// SPDX-License-Identifier: MIT
/// @file train/dead_units.hpp
/// @brief Which units (MxD experts, transcoder latents) no training token selected lately:
/// the state the AuxK loss (train/aux_loss.hpp) reads, kept apart from the layer so that
/// saving and restoring it (train/dead_units_io.hpp) needs no model code.
///
///     mxd::train::DeadUnits dead(cfg.n_experts, 8192);       // dead after 8192 tokens unseen
///     dead.record(ws.topk_idx.view(), ws.topk_val.view());   // after each training forward
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../error.hpp"
#include "../tensor.hpp"

namespace mxd::train {

/// Tokens since each unit was last selected in training, and which units are dead.
/// Every count starts at 0: no unit is dead before `window` tokens have been seen.
class DeadUnits {
public:
  DeadUnits() = default;
  DeadUnits(index_t n_units, index_t window) : since_(check_units(n_units), 0), window_(window) {
    MXD_CHECK(window > 0, "DeadUnits: window = ", window, " must be positive");
  }

  /// Records a training batch's selection. A unit counts as selected where its coefficient is
  /// positive (the held-out dead fraction of `mxd train` uses the same rule).
  /// idx, val: [B, k] host views (the forward's topk_idx, topk_val).
  template <class T>
  void record(ConstView<std::int32_t> idx, View<T> val) {
    check_shape(val, idx.rows, idx.cols, "DeadUnits::record: val");
    const index_t B = idx.rows, N = units();
    last_.assign(static_cast<std::size_t>(N), -1);  // last row of the batch that selected n
    for (index_t r = 0; r < B; ++r)
      for (index_t j = 0; j < idx.cols; ++j) {
        const std::int32_t n = idx(r, j);
        MXD_CHECK(n >= 0 && n < N, "DeadUnits::record: idx(", r, ", ", j, ") = ", n,
                  " is not a unit of ", N);
        if (val(r, j) > 0) last_[n] = r;
      }
    constexpr std::int64_t cap = std::numeric_limits<std::int64_t>::max() / 2;
    for (index_t n = 0; n < N; ++n)
      since_[n] = last_[n] >= 0 ? B - 1 - last_[n] : std::min<std::int64_t>(since_[n] + B, cap);
  }

  index_t units() const { return static_cast<index_t>(since_.size()); }
  index_t window() const { return window_; }
  /// True when unit n was not selected within the last window() tokens.
  bool dead(index_t n) const { return since_[n] >= window_; }
  /// The number of dead units.
  index_t count() const {
    index_t c = 0;
    for (std::int64_t s : since_) c += s >= window_;
    return c;
  }
  /// The dead units in ascending order, into `out`.
  void list(std::vector<std::int32_t>& out) const {
    out.clear();
    for (index_t n = 0; n < units(); ++n)
      if (dead(n)) out.push_back(static_cast<std::int32_t>(n));
  }

  /// Tokens since each unit was last selected: the whole state, for checkpoints.
  const std::vector<std::int64_t>& tokens_since() const { return since_; }
  /// Restores a state saved from tokens_since(): one non-negative count per unit.
  void restore(const std::vector<std::int64_t>& since) {
    MXD_CHECK(static_cast<index_t>(since.size()) == units(), "DeadUnits::restore: ",
              since.size(), " counts for ", units(), " units");
    for (std::size_t n = 0; n < since.size(); ++n)
      MXD_CHECK(since[n] >= 0, "DeadUnits::restore: unit ", n, " has the negative count ",
                since[n]);
    since_ = since;
  }

private:
  static std::size_t check_units(index_t n) {
    MXD_CHECK(n > 0 && n <= INT32_MAX, "DeadUnits: n_units = ", n, " must be in [1, 2^31)");
    return static_cast<std::size_t>(n);
  }
  std::vector<std::int64_t> since_;
  std::vector<index_t> last_;  // scratch of record()
  index_t window_ = 1;
};

}  // namespace mxd::train
