// SPDX-License-Identifier: MIT
/// @file parallel/expert_parallel.hpp
/// @brief Expert parallelism for the MxD: rank r owns the contiguous shard of experts
/// [first_r, first_r + N_r) (their rows of G, b_gate, C, with gradients and AdamW moments);
/// the dense part (E, b_enc, D, b_out, GLU, skip) is replicated and data-parallel.
///
/// Forward, for a global batch whose rows are split over the ranks (rank r owns B_r rows):
///   1. dense path on the rank's own rows: u_r = act(x_r E + b_enc) D           [B_r, O]
///   2. all-gather x; gate scores of all B rows against the shard:
///      s = relu(x G_r^T + b_gate_r) [B, N_r], local top-min(k, N_r)
///   3. each row's candidates go to the row's owner (all-to-all), which keeps the k best
///      under the single process's order (value desc, index asc): the same selection, since
///      every expert of the global top-k is in its shard's top-k. The selections of all rows
///      are all-gathered, so each rank knows which rows chose its experts.
///   4. partial mixtures v_q = sum over the shard's selected experts a_j c_j [B, O], summed
///      onto the rows' owners (reduce-scatter, rank order); y_r = u_r * v_r (+ skip) + b_out.
/// Backward mirrors it: dv of every row is all-gathered, each rank computes ds, dC, dG and
/// db_gate of its own experts from the (row, slot) pairs that chose them (O(B k) in all, as in
/// one process), and dx's gate term is reduce-scattered back to the owners. Dense gradients
/// are then summed across ranks (parallel::GradientReducer with dense_only).
///
/// Exactness: shard boundaries are multiples of 256 experts where N allows and row slices
/// start at multiples of 128 rows (parallel::split), the pieces of backend<cpu>::gemm, so the gate
/// scores and the selection are bit-identical to one process; sums across ranks (v, dx, the
/// dense gradients) are in another order than one process's: equal up to rounding.
///
/// Built from the layer's own pieces (detail::dense_forward/backward and backend<cpu>'s
/// primitives): a front end, not a second implementation. Steering is not supported here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../backend/cpu.hpp"
#include "../layer.hpp"
#include "../optim.hpp"
#include "communicator.hpp"
#include "data_parallel.hpp"

namespace mxd::parallel {

/// Expert shards start at multiples of this: the column width of the host GEMM's pieces in
/// float, so a shard's gate scores split into whole pieces.
constexpr index_t expert_align = detail::GemmShape<float>::nc;

/// Each rank's number of experts out of N, in rank order (parallel::split; N need not divide).
inline std::vector<index_t> expert_shards(index_t N, int ranks) {
  MXD_CHECK(N >= ranks, "n_experts = ", N, " cannot give each of ", ranks,
            " ranks an expert (use at least as many experts as processes)");
  return split(N, ranks, expert_align);
}

/// The config of a shard of `count` experts: n_experts = count, k = min(k, count).
inline Config shard_config(Config c, index_t count) {
  c.n_experts = count;
  c.k = std::min(c.k, count);
  return c;
}

/// A rank's parameter set: the dense part of `full` and experts [first, first + count) of its
/// per-expert parameters (ParamDesc::per_unit: rows, or a bias's columns).
template <class T>
Params<T> shard_params(const Params<T>& full, index_t first, index_t count) {
  const Config& c = full.config;
  MXD_CHECK(first >= 0 && count > 0 && first + count <= c.n_experts, "shard_params: experts [",
            first, ", ", first + count, ") outside the ", c.n_experts, " experts");
  Params<T> s(shard_config(c, count));
  std::vector<Tensor<T>*> out;  // the shard's tensors, in the same (layout) order as full's
  s.for_each([&](const char*, Tensor<T>& u) { out.push_back(&u); });
  std::size_t i = 0;
  full.for_each_param([&](const ParamDesc& d, const Tensor<T>& t) {
    Tensor<T>& dst = *out[i++];
    const index_t w = d.unit_size();
    if (d.per_unit) std::copy(t.data() + first * w, t.data() + (first + count) * w, dst.data());
    else std::copy(t.data(), t.data() + t.size(), dst.data());
  });
  return s;
}

/// Collective: the full parameter set on `root` from every rank's shard (the dense part is
/// root's own; experts in rank order). `full` must have the full config on root; elsewhere
/// it is not touched. shards[q]: rank q's expert count.
template <class T>
void gather_experts(Communicator& comm, const Params<T>& local, Params<T>& full,
                    const std::vector<index_t>& shards, int root = 0) {
  const bool here = comm.rank() == root;
  std::vector<Tensor<T>*> out;  // full's tensors on root, in the same order as local's
  if (here) full.for_each([&](const char*, Tensor<T>& u) { out.push_back(&u); });
  std::size_t i = 0;
  local.for_each_param([&](const ParamDesc& d, const Tensor<T>& t) {
    Tensor<T>* dst = here ? out[i++] : nullptr;
    if (d.per_unit) {
      // Gathered as rows of unit_size values (a bias [1, N_r]: N_r rows of one value).
      const index_t cols = d.unit_size();
      View<T> to = here ? View<T>(dst->data(), dst->size() / cols, cols) : View<T>();
      comm.gather<T>(ConstView<T>(t.data(), t.size() / cols, cols), to, shards, root);
    } else if (here) {
      std::copy(t.data(), t.data() + t.size(), dst->data());
    }
  });
}

/// The expert-parallel MxD of one rank (see the file comment). Params, Grads and AdamW of the
/// rank are ordinary ones of shard_config(full, shards[rank]).
template <class T>
class ExpertParallel {
public:
  ExpertParallel(Communicator& comm, const Config& full) : comm_(comm), full_(full) {
    full.validate();
    shards_ = expert_shards(full.n_experts, comm.size());
    first_ = offsets(shards_)[comm.rank()];
  }

  const Config& full_config() const { return full_; }
  const std::vector<index_t>& shards() const { return shards_; }
  /// This rank's first expert and its config (n_experts = its shard).
  index_t first_expert() const { return first_; }
  Config local_config() const { return shard_config(full_, shards_[comm_.rank()]); }

  /// y_r = MxD(x)_r for this rank's rows of a global batch. rows[q]: rank q's row count (0
  /// allowed, for forward only);
  /// x: [rows[rank], I], y: [rows[rank], O]. ws keeps the dense cache of the rank's rows and
  /// their final selection (ws.topk_idx, ws.topk_val: [rows[rank], k], global expert indices).
  void forward(const Params<T>& p, InView<T, cpu> x, View<T> y, Workspace<T>& ws,
               const std::vector<index_t>& rows) {
    using be = backend<cpu>;
    const Config& c = p.config;
    check_local(c);
    MXD_CHECK(static_cast<int>(rows.size()) == comm_.size(), "ExpertParallel::forward: ",
              rows.size(), " row counts for ", comm_.size(), " ranks");
    const int P = comm_.size(), r = comm_.rank();
    const index_t Br = rows[r], B = offsets(rows).back(), k = full_.k, Nr = c.n_experts;
    const index_t I = c.d_in, H = c.d_hidden, O = c.d_out;
    check_shape(x, Br, I, "x");
    check_shape(y, Br, O, "y");
    // A rank may hold no rows (a short last batch of held-out rows): it still serves its experts.
    MXD_CHECK(B > 0 && x.contiguous() && y.contiguous(),
              "ExpertParallel::forward: an empty batch, or views that are not contiguous");
    rows_ = rows;
    auto& ctx = ws.ctx;

    // 1. Dense path on the rank's own rows.
    ws.batch = Br;
    ws.steered = false;
    ws.hpre.resize(Br, H, false);
    ws.g.resize(c.glu ? Br : 0, H, false);
    ws.z.resize(Br, H, false);
    ws.u.resize(Br, O, false);
    ws.v.resize(Br, O, false);
    detail::dense_forward(ctx, p, x, ws.hpre.view(), ws.g.view(), ws.z.view(), ws.u.view());

    // 2. Gate scores of all rows against this shard, and its top-min(k, N_r).
    X_.resize(B, I, false);
    comm_.all_gather<T>(x, X_.view(), rows);
    // In row tiles, as forward() does: no [B, N_r] buffer, and the same bits for any tile.
    const index_t tile = ws.tile_for(B, std::size_t(Nr) * sizeof(T));
    scores_.resize(tile, Nr, false);
    cand_idx_.resize(B, k, false);
    cand_val_.resize(B, k, false);
    const index_t kr = c.k;  // min(k, N_r)
    for (index_t r0 = 0; r0 < B; r0 += tile) {
      const index_t n = std::min(tile, B - r0);
      auto s = scores_.view().block_rows(0, n);
      be::gemm(ctx, false, true, T(1), ConstView<T>(X_.view().block_rows(r0, n)), p.G.view(), T(0), s);
      be::gate_topk(ctx, s, p.b_gate.view(), kr, View<std::int32_t>(cand_idx_.data() + r0 * k, n, kr, k),
                    View<T>(cand_val_.data() + r0 * k, n, kr, k), r0);
    }
    for (index_t b = 0; b < B; ++b) {
      for (index_t j = 0; j < kr; ++j) cand_idx_(b, j) += static_cast<std::int32_t>(first_);
      for (index_t j = kr; j < k; ++j) {  // padding: ranks after every real candidate
        cand_idx_(b, j) = INT32_MAX;
        cand_val_(b, j) = T(-1);
      }
    }

    // 3. Candidates to the rows' owners; the owner keeps the k best of the P k.
    std::vector<index_t> send(rows), recv(static_cast<std::size_t>(P), Br * k);
    for (auto& s : send) s *= k;
    recv_idx_.resize(P * Br, k, false);
    recv_val_.resize(P * Br, k, false);
    comm_.all_to_all_raw(cand_idx_.data(), send.data(), recv_idx_.data(), recv.data(), Type::i32);
    comm_.all_to_all_raw(cand_val_.data(), send.data(), recv_val_.data(), recv.data(), type_of<T>());
    count_all_to_all(send, sizeof(std::int32_t) + sizeof(T));
    ws.topk_idx.resize(Br, k, false);
    ws.topk_val.resize(Br, k, false);
    std::vector<detail::Candidate<T>> cands(static_cast<std::size_t>(P * k));
    for (index_t b = 0; b < Br; ++b) {
      for (int q = 0; q < P; ++q)
        for (index_t j = 0; j < k; ++j)
          cands[q * k + j] = {recv_val_(q * Br + b, j), recv_idx_(q * Br + b, j)};
      std::partial_sort(cands.begin(), cands.begin() + k, cands.end());
      for (index_t j = 0; j < k; ++j) {
        ws.topk_idx(b, j) = cands[j].index;
        ws.topk_val(b, j) = cands[j].value;
      }
    }
    sel_idx_.resize(B, k, false);
    sel_val_.resize(B, k, false);
    comm_.all_gather<std::int32_t>(ws.topk_idx.view(), sel_idx_.view(), rows);
    comm_.all_gather<T>(ws.topk_val.view(), sel_val_.view(), rows);
    // The selections in this shard, as local indices; the others point at a sink expert N_r
    // with coefficient 0, which every primitive skips (and group_by_expert files apart).
    lidx_.resize(B, k, false);
    lval_.resize(B, k, false);
    for (index_t i = 0; i < B * k; ++i) {
      const index_t n = sel_idx_[i] - first_;
      const bool mine = n >= 0 && n < Nr;
      lidx_[i] = static_cast<std::int32_t>(mine ? n : Nr);
      lval_[i] = mine ? sel_val_[i] : T(0);
    }

    // 4. Partial mixtures of all rows, summed onto their owners; then the output
    //    y = u * v (+ skip) + b_out through the same primitive as one process.
    vpart_.resize(B, O, false);
    be::gather_rows(ctx, ConstView<std::int32_t>(lidx_.view()), ConstView<T>(lval_.view()),
                    p.C.view(), vpart_.view(), false);
    comm_.reduce_scatter<T>(vpart_.view(), ws.v.view(), rows);
    if (c.skip) be::gemm(ctx, false, true, T(1), x, p.W_skip.view(), T(0), y);
    be::modulate(ctx, ConstView<T>(ws.u.view()), ConstView<T>(ws.v.view()), p.b_out.view(), y,
                 c.skip);
  }

  /// Backward of the last forward: this rank's expert gradients (complete: every row that
  /// chose its experts contributes) and its rows' share of the dense gradients (sum them with
  /// GradientReducer and dense_only before the optimizer). dy: [rows[rank], O]; dx:
  /// [rows[rank], I] or empty. Gradients are written per `mode`.
  void backward(const Params<T>& p, InView<T, cpu> x, InView<T, cpu> dy, Workspace<T>& ws,
                Grads<T>& g, View<T> dx = {}, GradMode mode = GradMode::Overwrite) {
    using be = backend<cpu>;
    using CV = ConstView<T>;
    const Config& c = p.config;
    check_local(c);
    const index_t Br = ws.batch, B = offsets(rows_).back(), k = full_.k, Nr = c.n_experts;
    MXD_CHECK(Br > 0 && Br == rows_[comm_.rank()], "ExpertParallel::backward: call forward first");
    check_shape(x, Br, c.d_in, "x");
    check_shape(dy, Br, c.d_out, "dy");
    if (!dx.empty()) check_shape(dx, Br, c.d_in, "dx");
    MXD_CHECK(g.G.rows() == Nr && g.E.rows() == c.d_in && g.config.glu == c.glu &&
                  g.config.skip == c.skip,
              "ExpertParallel::backward: gradient buffers were made for another config");
    const bool acc = mode == GradMode::Accumulate;
    const T beta = acc ? T(1) : T(0);
    auto& ctx = ws.ctx;
    const index_t H = c.d_hidden, O = c.d_out;
    ws.du.resize(Br, O, false);
    ws.dv.resize(Br, O, false);
    ws.dz.resize(Br, H, false);
    ws.dhpre.resize(Br, H, false);
    ws.dg.resize(c.glu ? Br : 0, H, false);

    be::col_sum(ctx, dy, beta, g.b_out.view());
    if (c.skip) be::gemm(ctx, true, false, T(1), dy, x, beta, g.W_skip.view());
    be::output_backward(ctx, dy, ws.u.view(), ws.v.view(), ws.du.view(), ws.dv.view());

    // Experts: dv of every row, then the shard's (row, slot) pairs as in one process.
    DV_.resize(B, O, false);
    comm_.all_gather<T>(ws.dv.view(), DV_.view(), rows_);
    ds_.resize(B, k, false);
    order_.resize(1, B * k, false);
    offs_.resize(1, Nr + 2, false);
    be::expert_coefficient_grad(ctx, ConstView<std::int32_t>(lidx_.view()), CV(lval_.view()),
                                p.C.view(), CV(DV_.view()), ds_.view());
    be::group_by_expert(ctx, ConstView<std::int32_t>(lidx_.view()), Nr + 1, order_.view(),
                        offs_.view());
    be::expert_weight_grads(ctx, ConstView<std::int32_t>(lidx_.view()), CV(lval_.view()),
                            CV(ds_.view()), ConstView<std::int32_t>(order_.view()),
                            ConstView<std::int32_t>(offs_.view()), CV(DV_.view()), CV(X_.view()),
                            g.C.view(), g.G.view(), g.b_gate.view(), acc);

    detail::dense_backward(ctx, p, x, ws, g, beta, dx);
    if (dx.empty()) return;
    if (c.skip) be::gemm(ctx, false, false, T(1), dy, p.W_skip.view(), T(1), dx);
    // The gate's term of dx: every rank's share for all rows, summed onto the owners.
    dxpart_.resize(B, c.d_in, false);
    be::gather_rows(ctx, ConstView<std::int32_t>(lidx_.view()), CV(ds_.view()), p.G.view(),
                    dxpart_.view(), false);
    dxown_.resize(Br, c.d_in, false);
    comm_.reduce_scatter<T>(dxpart_.view(), dxown_.view(), rows_);
    for (index_t i = 0; i < dx.size(); ++i) dx.data[i] += dxown_[i];
  }

  /// Bytes of this rank's buffers (beyond the workspace's dense cache).
  std::size_t bytes() const {
    return X_.bytes() + scores_.bytes() + cand_idx_.bytes() + cand_val_.bytes() +
           recv_idx_.bytes() + recv_val_.bytes() + sel_idx_.bytes() + sel_val_.bytes() +
           lidx_.bytes() + lval_.bytes() + vpart_.bytes() + DV_.bytes() + ds_.bytes() +
           order_.bytes() + offs_.bytes() + dxpart_.bytes() + dxown_.bytes();
  }

private:
  void check_local(const Config& c) const {
    const Config l = local_config();
    MXD_CHECK(c.n_experts == l.n_experts && c.d_in == l.d_in && c.d_hidden == l.d_hidden &&
                  c.d_out == l.d_out && c.glu == l.glu && c.skip == l.skip,
              "ExpertParallel: rank ", comm_.rank(), " holds ", c.n_experts,
              " experts but its shard has ", l.n_experts, " (make its Params with local_config())");
  }
  void count_all_to_all(const std::vector<index_t>& send, std::size_t elem) {
    for (int q = 0; q < comm_.size(); ++q)
      if (q != comm_.rank()) comm_.bytes_sent += static_cast<std::uint64_t>(send[q]) * elem;
  }

  Communicator& comm_;
  Config full_;
  std::vector<index_t> shards_, rows_;
  index_t first_ = 0;
  // B = global rows, Br = this rank's, k = full top-k, Nr = shard size.
  Tensor<T> X_;                             // [B, I] every rank's x
  Tensor<T> scores_;                        // [tile, Nr] (a row tile of the gate scores)
  Tensor<std::int32_t> cand_idx_;           // [B, k] this shard's candidates (global indices)
  Tensor<T> cand_val_;
  Tensor<std::int32_t> recv_idx_;           // [P Br, k] every shard's candidates of own rows
  Tensor<T> recv_val_;
  Tensor<std::int32_t> sel_idx_;            // [B, k] the final selection of every row
  Tensor<T> sel_val_;
  Tensor<std::int32_t> lidx_;               // [B, k] in-shard index, or Nr (sink)
  Tensor<T> lval_;                          // [B, k] coefficient, 0 outside the shard
  Tensor<T> vpart_;                         // [B, O] this shard's partial mixture of every row
  Tensor<T> DV_;                            // [B, O] dv of every row
  Tensor<T> ds_;                            // [B, k]
  Tensor<std::int32_t> order_, offs_;       // [1, B k], [1, Nr + 2]
  Tensor<T> dxpart_, dxown_;                // [B, I], [Br, I]
};

}  // namespace mxd::parallel
