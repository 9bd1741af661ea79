// SPDX-License-Identifier: MIT
/// @file parallel/communicator.hpp
/// @brief parallel::Communicator: the collectives that data- and expert-parallel training need
/// (all-reduce, all-gather, reduce-scatter, gather, broadcast) over mxd's views, and the
/// agreement that turns one rank's error into the same mxd::Error on every rank.
///
/// An implementation provides a few byte-level primitives (an all-to-all, an all-gather, a
/// gather, a broadcast and a minimum of one int per rank); the sums are computed here, always
/// in rank order 0, 1, ..., P-1 by the rank that owns a chunk, so every rank gets the same bits
/// and a run with the same P repeats bit for bit, whatever the transport's own algorithms.
///
///     mxd::parallel::MpiCommunicator comm(argc, argv);          // parallel/mpi.hpp
///     comm.all_reduce(grads.E.view());                      // sum over ranks, in place
///     auto rows = mxd::parallel::split(B, comm.size(), 128);    // rows[r]: rank r's share of B
///     comm.all_gather<float>(x_r.view(), x_all.view(), rows);  // [rows[r], I] -> [B, I]
///
/// Views are host views (Device = cpu); parallel/cuda.cuh stages device views through host memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../error.hpp"
#include "../tensor.hpp"

namespace mxd::parallel {

/// Element types the transports move.
enum class Type { u8, i32, f32, f64 };

template <class T>
constexpr Type type_of() {
  static_assert(std::is_same_v<T, std::uint8_t> || std::is_same_v<T, std::int32_t> ||
                    std::is_same_v<T, float> || std::is_same_v<T, double>,
                "parallel: element type must be uint8_t, int32_t, float or double");
  if constexpr (std::is_same_v<T, std::uint8_t>) return Type::u8;
  else if constexpr (std::is_same_v<T, std::int32_t>) return Type::i32;
  else if constexpr (std::is_same_v<T, float>) return Type::f32;
  else return Type::f64;
}

inline std::size_t type_size(Type t) {
  switch (t) {
    case Type::u8: return 1;
    case Type::i32: case Type::f32: return 4;
    case Type::f64: return 8;
  }
  return 0;
}

/// Splits n items into `parts` contiguous shares (returned as counts). Share boundaries are
/// multiples of `align` where n allows (whole blocks of `align` are dealt out, the first ranks
/// taking one more), so a share holds whole GEMM pieces and gate-score tiles; with fewer blocks
/// than parts the items are split as evenly as possible. Shares may differ by a block.
inline std::vector<index_t> split(index_t n, int parts, index_t align = 1) {
  MXD_CHECK(parts > 0, "parallel::split: ", parts, " parts");
  MXD_CHECK(n >= 0 && align > 0, "parallel::split: n = ", n, ", align = ", align);
  std::vector<index_t> counts(static_cast<std::size_t>(parts), 0);
  const index_t blocks = (n + align - 1) / align;
  if (blocks >= parts) {
    for (int r = 0; r < parts; ++r) {
      const index_t b = blocks / parts + (r < blocks % parts ? 1 : 0);
      counts[r] = b * align;
    }
    counts[parts - 1] -= blocks * align - n;  // the last block may be short
    // A short last block can leave the last share empty only when align > n / parts; then
    // fall through to the even split below.
    if (counts[parts - 1] > 0) return counts;
  }
  for (int r = 0; r < parts; ++r) counts[r] = n / parts + (r < n % parts ? 1 : 0);
  return counts;
}

/// The first item of each share, and the end: offsets[r] .. offsets[r + 1].
inline std::vector<index_t> offsets(const std::vector<index_t>& counts) {
  std::vector<index_t> o(counts.size() + 1, 0);
  for (std::size_t r = 0; r < counts.size(); ++r) o[r + 1] = o[r] + counts[r];
  return o;
}

/// What a collective throws when its wait runs past Communicator::timeout: a rank is silent
/// and the others are left waiting, so the group cannot go on (end it with abort()).
class TimeoutError : public Error {
public:
  using Error::Error;
};

/// The collectives of one group of P processes ("ranks"). Every rank must call the same
/// collectives in the same order with matching shapes; a rank that cannot go on says so
/// through agree() rather than leaving the others waiting.
class Communicator {
public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // ---- Transport primitives: host memory, counts in elements of type t. ----------------
  /// Sends send[sdisp[q] .. + scounts[q]) to rank q; receives rank q's block into
  /// recv[rdisp[q] .. + rcounts[q]). Displacements are the running sums of the counts.
  virtual void all_to_all_raw(const void* send, const index_t* scounts, void* recv,
                              const index_t* rcounts, Type t) = 0;
  /// Every rank's `count` elements, concatenated in rank order; counts[q] = rank q's count.
  virtual void all_gather_raw(const void* send, index_t count, void* recv,
                              const index_t* counts, Type t) = 0;
  /// As all_gather_raw, but only `root` receives (recv may be null elsewhere).
  virtual void gather_raw(const void* send, index_t count, void* recv, const index_t* counts,
                          Type t, int root) = 0;
  virtual void broadcast_raw(void* data, index_t count, Type t, int root) = 0;
  /// The minimum of v over all ranks.
  virtual int all_min(int v) = 0;
  /// Ends every rank's process now with `code` (the last resort when ranks cannot agree, e.g.
  /// an error inside a collective sequence that the other ranks are already waiting in).
  [[noreturn]] virtual void abort(int code) = 0;

  /// Bytes this rank has handed to the transport for other ranks (payload only, each block
  /// counted once per destination), since construction or the last reset.
  std::uint64_t bytes_sent = 0;
  /// Set when agree() has thrown: every rank is throwing the same error (nobody is left
  /// waiting in a collective), so each may end normally.
  bool failed_together = false;
  /// Seconds a collective may wait for the other ranks (0: no limit). A transport whose wait
  /// runs past it throws TimeoutError, naming the ranks that did not answer.
  double timeout = 0;

  // ---- Collectives over views (host, contiguous). -----------------------------------------

  /// v = sum over ranks of v, identical bits on every rank: the elements are cut into P
  /// chunks; rank q receives every rank's chunk q, sums them in rank order and all-gathers.
  template <class T>
  void all_reduce(View<T> v) {
    require_contiguous(v, "all_reduce");
    const int P = size();
    if (P == 1) return;
    const std::vector<index_t> chunk = split(v.size(), P);
    std::vector<T> own(static_cast<std::size_t>(chunk[rank()]));
    reduce_scatter_flat(v.data, chunk, own.data());
    all_gather_raw(own.data(), chunk[rank()], v.data, chunk.data(), type_of<T>());
    count_gather(chunk[rank()], sizeof(T));
  }

  /// Rank r gets the rank-order sum of every rank's rows [offset r, + rows[r]) of `in`.
  /// in: [sum rows, C] on every rank (its partial values of all rows), out: [rows[rank], C].
  template <class T>
  void reduce_scatter(InView<T, cpu> in, View<T> out, const std::vector<index_t>& rows) {
    check_rows(rows, "reduce_scatter");
    require_contiguous(in, "reduce_scatter");
    require_contiguous(out, "reduce_scatter");
    const index_t C = in.cols, total = offsets(rows).back();
    check_shape(in, total, C, "reduce_scatter input");
    check_shape(out, rows[rank()], C, "reduce_scatter output");
    std::vector<index_t> counts(rows);
    for (auto& c : counts) c *= C;
    if (size() == 1) {
      std::copy(in.data, in.data + in.size(), out.data);
      return;
    }
    reduce_scatter_flat(in.data, counts, out.data);
  }

  /// out = every rank's `in` stacked in rank order. in: [rows[rank], C], out: [sum rows, C].
  template <class T>
  void all_gather(InView<T, cpu> in, View<T> out, const std::vector<index_t>& rows) {
    check_rows(rows, "all_gather");
    require_contiguous(in, "all_gather");
    require_contiguous(out, "all_gather");
    const index_t C = in.cols;
    check_shape(in, rows[rank()], C, "all_gather input");
    check_shape(out, offsets(rows).back(), C, "all_gather output");
    std::vector<index_t> counts(rows);
    for (auto& c : counts) c *= C;
    all_gather_raw(in.data, counts[rank()], out.data, counts.data(), type_of<T>());
    count_gather(counts[rank()], sizeof(T));
  }

  /// As all_gather, onto `root` only (out is ignored elsewhere and may be empty there).
  template <class T>
  void gather(InView<T, cpu> in, View<T> out, const std::vector<index_t>& rows, int root = 0) {
    check_rows(rows, "gather");
    require_contiguous(in, "gather");
    const index_t C = in.cols;
    check_shape(in, rows[rank()], C, "gather input");
    if (rank() == root) {
      require_contiguous(out, "gather");
      check_shape(out, offsets(rows).back(), C, "gather output");
    }
    std::vector<index_t> counts(rows);
    for (auto& c : counts) c *= C;
    gather_raw(in.data, counts[rank()], rank() == root ? out.data : nullptr, counts.data(),
               type_of<T>(), root);
    if (rank() != root) bytes_sent += static_cast<std::uint64_t>(counts[rank()]) * sizeof(T);
  }

  /// v = root's v on every rank.
  template <class T>
  void broadcast(View<T> v, int root = 0) {
    require_contiguous(v, "broadcast");
    if (size() == 1) return;
    broadcast_raw(v.data, v.size(), type_of<T>(), root);
    if (rank() == root) bytes_sent += static_cast<std::uint64_t>(v.size()) * (size() - 1) * sizeof(T);
  }

  /// root's string on every rank.
  std::string broadcast(std::string s, int root = 0) {
    if (size() == 1) return s;
    std::int32_t n = static_cast<std::int32_t>(s.size());
    broadcast_raw(&n, 1, Type::i32, root);
    s.resize(static_cast<std::size_t>(n));
    if (n > 0) broadcast_raw(s.data(), n, Type::u8, root);
    return s;
  }

  /// Collective: when any rank passes ok = false, every rank throws mxd::Error with the
  /// message of the lowest such rank ("rank R: <error>"); otherwise returns everywhere.
  void agree(bool ok, const std::string& error = "") {
    if (size() == 1) {
      failed_together = !ok;
      if (!ok) throw Error(error);
      return;
    }
    const int first_bad = all_min(ok ? size() : rank());
    if (first_bad == size()) return;
    const std::string msg = broadcast(ok ? std::string() : error, first_bad);
    failed_together = true;
    throw Error(mxd::detail::concat("rank ", first_bad, ": ", msg));
  }

  /// Runs f(); an mxd::Error it throws on any rank becomes the same error on every rank
  /// (agree). f must not call collectives: the ranks agree right after it.
  template <class F>
  void together(F&& f) {
    std::string err;
    bool ok = true;
    try {
      f();
    } catch (const Error& e) {
      ok = false;
      err = e.what();
    }
    agree(ok, err);
  }

  /// Collective: throws on every rank unless `value` is the same on all of them. `what`
  /// names the value in the message, which quotes rank 0's and the first differing rank's.
  void check_same(const std::string& what, const std::string& value) {
    const std::string ref = broadcast(value, 0);
    agree(ref == value, mxd::detail::concat(what, " differs between ranks: '", value, "' here, '",
                                       ref, "' on rank 0"));
  }

protected:
  // One rank's chunk sums: rank q receives every rank's block q of `data` (counts[q]
  // elements each) and sums them in rank order into out[counts[rank]].
  template <class T>
  void reduce_scatter_flat(const T* data, const std::vector<index_t>& counts, T* out) {
    const int P = size(), r = rank();
    const index_t mine = counts[r];
    std::vector<index_t> rcounts(static_cast<std::size_t>(P), mine);
    std::vector<T> recv(static_cast<std::size_t>(mine * P));
    all_to_all_raw(data, counts.data(), recv.data(), rcounts.data(), type_of<T>());
    std::uint64_t sent = 0;
    for (int q = 0; q < P; ++q)
      if (q != r) sent += static_cast<std::uint64_t>(counts[q]);
    bytes_sent += sent * sizeof(T);
    std::copy(recv.begin(), recv.begin() + mine, out);
    for (int q = 1; q < P; ++q) {
      const T* b = recv.data() + q * mine;
      for (index_t i = 0; i < mine; ++i) out[i] += b[i];
    }
  }

private:
  void count_gather(index_t own, std::size_t elem) {
    bytes_sent += static_cast<std::uint64_t>(own) * static_cast<std::uint64_t>(size() - 1) * elem;
  }
  template <class V>
  static void require_contiguous(const V& v, const char* op) {
    MXD_CHECK(v.contiguous() || v.empty(), "parallel::", op, ": the view must be contiguous (ld ",
              v.ld, " != cols ", v.cols, ")");
  }
  void check_rows(const std::vector<index_t>& rows, const char* op) const {
    MXD_CHECK(static_cast<int>(rows.size()) == size(), "parallel::", op, ": ", rows.size(),
              " row counts for ", size(), " ranks");
  }
};

/// The group of one process: every collective is a copy (or nothing). What the distributed
/// code runs on when it is not started under a launcher.
class SelfCommunicator final : public Communicator {
public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_to_all_raw(const void* send, const index_t* scounts, void* recv, const index_t*,
                      Type t) override {
    copy(send, recv, scounts[0], t);
  }
  void all_gather_raw(const void* send, index_t count, void* recv, const index_t*, Type t) override {
    copy(send, recv, count, t);
  }
  void gather_raw(const void* send, index_t count, void* recv, const index_t*, Type t,
                  int) override {
    copy(send, recv, count, t);
  }
  void broadcast_raw(void*, index_t, Type, int) override {}
  int all_min(int v) override { return v; }
  [[noreturn]] void abort(int code) override { std::exit(code); }

private:
  static void copy(const void* from, void* to, index_t n, Type t) {
    if (n > 0 && from != to) std::memmove(to, from, static_cast<std::size_t>(n) * type_size(t));
  }
};

}  // namespace mxd::parallel

namespace mxd {
/// mxd::parallel's name before 0.2 (when include/mxd/parallel/ was include/mxd/dist/), for
/// one release.
namespace dist = parallel;
}  // namespace mxd
