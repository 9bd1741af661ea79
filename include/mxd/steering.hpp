// SPDX-License-Identifier: MIT
/// @file steering.hpp
/// @brief Steering and ablation: edits of the expert coefficients after top-k, applied by
/// forward() and respected by backward().
///
///     mxd::Steering s;
///     s.add(123, 100.0);     // the authors' steering: expert 123's coefficient + 100, every row
///     s.zero(7);             // ablate expert 7
///     mxd::forward(params, x, y, ws, &s);
///
/// Semantics per row, for expert n:
///   add(n, v):   a_n += v. If top-k selected n with a positive score, the gate still receives
///                its gradient (d a_n / d s_n = 1); otherwise n is forced on with a_n = v and
///                the gate receives none.
///   clamp(n, v): a_n = v (forced on if not selected); no gradient reaches the gate for n.
///   zero(n):     a_n = 0; no gradient reaches the gate for n.
/// c_n receives a_n dv in every case, as for any selected expert. Edits apply in the order
/// given, so add(n, 5).zero(n) ablates n and zero(n).add(n, 5) sets a_n = 5 (no gate gradient).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "device.hpp"
#include "tensor.hpp"

namespace mxd {

struct Steering {
  enum class Op { add, clamp, zero };
  struct Edit {
    index_t expert;
    Op op;
    double value;
  };
  std::vector<Edit> edits;

  Steering& add(index_t expert, double value) { return push({expert, Op::add, value}); }
  Steering& clamp(index_t expert, double value) { return push({expert, Op::clamp, value}); }
  Steering& zero(index_t expert) { return push({expert, Op::zero, 0.0}); }

  /// Throws mxd::Error unless every edit names an expert in [0, n_experts) with a finite value.
  void validate(index_t n_experts) const {
    for (const Edit& e : edits) {
      MXD_CHECK(e.expert >= 0 && e.expert < n_experts, "Steering: expert ", e.expert,
                " is outside [0, ", n_experts, ")");
      MXD_CHECK(std::isfinite(e.value), "Steering: value ", e.value, " for expert ", e.expert,
                " is not finite");
    }
  }

private:
  Steering& push(const Edit& e) {
    edits.push_back(e);
    return *this;
  }
};

namespace detail {

/// steer_selection's edits of one row, for the host loop below and the GPU's kernel
/// (backend/cuda/steering.cuh, one thread per row). idx, gate, coef point at the row's
/// k + E columns; edits[0, E) are s.edits.
template <class T>
MXD_HOST_DEVICE void steer_row(const Steering::Edit* edits, index_t E, index_t k,
                               std::int32_t* idx, T* gate, T* coef) {
  for (index_t j = 0; j < k; ++j) coef[j] = gate[j];
  for (index_t e = 0; e < E; ++e) {
    const Steering::Edit ed = edits[e];
    idx[k + e] = static_cast<std::int32_t>(ed.expert);
    gate[k + e] = T(0);
    coef[k + e] = T(0);
    // The expert's own top-k slot if it was selected with a > 0, else the column an earlier
    // edit forced it on in, so that edits of one expert compose in order.
    index_t slot = k + e;
    for (index_t j = 0; j < k + e && slot == k + e; ++j)
      if (idx[j] == ed.expert && (j >= k || gate[j] > T(0))) slot = j;
    switch (ed.op) {
      case Steering::Op::add: coef[slot] += static_cast<T>(ed.value); break;
      case Steering::Op::clamp: coef[slot] = static_cast<T>(ed.value); gate[slot] = T(0); break;
      case Steering::Op::zero: coef[slot] = T(0); gate[slot] = T(0); break;
    }
  }
}

}  // namespace detail

/// Applies `s` to a selection on the host. On entry the first k columns of idx and gate hold
/// top-k's (index, value) pairs; the other columns (one per edit) are filled here. On exit
/// `coef` holds the coefficients forward mixes with and `gate` the values whose positivity
/// lets gradient reach the gate (zero where an edit cuts it).
/// idx, gate, coef: [B, k + edits].
template <class T>
void steer_selection(Context<cpu>&, const Steering& s, index_t k, View<std::int32_t, cpu> idx,
                     View<T, cpu> gate, View<T, cpu> coef) {
  const index_t E = static_cast<index_t>(s.edits.size());
  for (index_t r = 0; r < idx.rows; ++r)
    detail::steer_row(s.edits.data(), E, k, idx.row(r), gate.row(r), coef.row(r));
}

}  // namespace mxd
