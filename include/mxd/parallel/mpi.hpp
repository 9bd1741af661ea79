// SPDX-License-Identifier: MIT
/// @file parallel/mpi.hpp
/// @brief parallel::MpiCommunicator: the Communicator over MPI (link mxd::mpi).
///
///     int main(int argc, char** argv) {
///       mxd::parallel::MpiCommunicator comm(&argc, &argv);   // MPI_Init unless already done
///       ...                                              // comm.rank(), comm.all_reduce(...)
///     }                                                  // MPI_Finalize if it initialised MPI
///
/// Every MPI call returns its error (MPI_ERRORS_RETURN on a private duplicate of
/// MPI_COMM_WORLD) and becomes an mxd::Error naming the call. Counts are MPI's ints: a single
/// message of more than 2^31 - 1 elements is refused with an error naming its size.
///
/// Collectives are started non-blocking and polled, so a wait can end: past `timeout`
/// seconds the waiting rank asks every other rank whether it is there (ranks waiting in a
/// collective answer at once) and throws an error naming those that stay silent (stopped,
/// hung in a file system, or stuck in other code).
#pragma once

#include <algorithm>
#include <chrono>
#include <climits>
#include <string>
#include <thread>
#include <vector>

// MPI's C API only: not the deprecated C++ bindings that some mpi.h pull in.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include "communicator.hpp"

namespace mxd::parallel {

class MpiCommunicator final : public Communicator {
public:
  /// Initialises MPI (threads: funneled, only the calling thread talks to MPI) unless the
  /// program already has, and works on a duplicate of MPI_COMM_WORLD.
  MpiCommunicator(int* argc, char*** argv) {
    int done = 0;
    MPI_Initialized(&done);
    if (!done) {
      int provided = 0;
      check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
      owns_mpi_ = true;
    }
    check(MPI_Comm_dup(MPI_COMM_WORLD, &comm_), "MPI_Comm_dup");
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_dup(comm_, &roll_call_), "MPI_Comm_dup");
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  ~MpiCommunicator() override {
    MPI_Comm_free(&roll_call_);
    MPI_Comm_free(&comm_);
    if (owns_mpi_) {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized) MPI_Finalize();
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_to_all_raw(const void* send, const index_t* scounts, void* recv,
                      const index_t* rcounts, Type t) override {
    std::vector<int> sc, sd, rc, rd;
    ints(scounts, sc, sd, "MPI_Alltoallv");
    ints(rcounts, rc, rd, "MPI_Alltoallv");
    MPI_Request req;
    check(MPI_Ialltoallv(send, sc.data(), sd.data(), mpi_type(t), recv, rc.data(), rd.data(),
                         mpi_type(t), comm_, &req),
          "MPI_Ialltoallv");
    wait(req, "MPI_Ialltoallv");
  }
  void all_gather_raw(const void* send, index_t count, void* recv, const index_t* counts,
                      Type t) override {
    std::vector<int> rc, rd;
    ints(counts, rc, rd, "MPI_Allgatherv");
    MPI_Request req;
    check(MPI_Iallgatherv(send, int(count), mpi_type(t), recv, rc.data(), rd.data(),
                          mpi_type(t), comm_, &req),
          "MPI_Iallgatherv");
    wait(req, "MPI_Iallgatherv");
  }
  void gather_raw(const void* send, index_t count, void* recv, const index_t* counts, Type t,
                  int root) override {
    std::vector<int> rc, rd;
    ints(counts, rc, rd, "MPI_Gatherv");
    MPI_Request req;
    check(MPI_Igatherv(send, int(count), mpi_type(t), recv, rc.data(), rd.data(), mpi_type(t),
                       root, comm_, &req),
          "MPI_Igatherv");
    wait(req, "MPI_Igatherv");
  }
  void broadcast_raw(void* data, index_t count, Type t, int root) override {
    MXD_CHECK(count <= INT_MAX, "MPI_Bcast: ", count, " elements exceed MPI's int counts");
    MPI_Request req;
    check(MPI_Ibcast(data, int(count), mpi_type(t), root, comm_, &req), "MPI_Ibcast");
    wait(req, "MPI_Ibcast");
  }
  int all_min(int v) override {
    int out = v;
    MPI_Request req;
    check(MPI_Iallreduce(&v, &out, 1, MPI_INT, MPI_MIN, comm_, &req), "MPI_Iallreduce");
    wait(req, "MPI_Iallreduce");
    return out;
  }
  [[noreturn]] void abort(int code) override {
    MPI_Abort(comm_, code);
    std::exit(code);  // not reached: MPI_Abort ends the process
  }

  MPI_Comm comm() const { return comm_; }

private:
  static MPI_Datatype mpi_type(Type t) {
    switch (t) {
      case Type::u8: return MPI_UNSIGNED_CHAR;
      case Type::i32: return MPI_INT32_T;
      case Type::f32: return MPI_FLOAT;
      case Type::f64: return MPI_DOUBLE;
    }
    return MPI_DATATYPE_NULL;
  }
  // Per-rank counts and their displacements as MPI's ints.
  void ints(const index_t* counts, std::vector<int>& c, std::vector<int>& d, const char* call) const {
    c.resize(static_cast<std::size_t>(size_));
    d.resize(static_cast<std::size_t>(size_));
    index_t at = 0;
    for (int q = 0; q < size_; ++q) {
      MXD_CHECK(counts[q] >= 0 && at + counts[q] <= INT_MAX, call, ": ", at + counts[q],
                " elements exceed MPI's int counts");
      c[q] = int(counts[q]);
      d[q] = int(at);
      at += counts[q];
    }
  }
  using clock = std::chrono::steady_clock;
  static double since(clock::time_point t) {
    return std::chrono::duration<double>(clock::now() - t).count();
  }
  enum Tag { ping = 1, pong = 2 };

  // Polls a started collective to completion, answering roll calls meanwhile; past `timeout`
  // throws, naming the ranks that do not answer one.
  void wait(MPI_Request& req, const char* call) {
    const clock::time_point start = clock::now();
    for (int spin = 0;; ++spin) {
      int done = 0;
      check(MPI_Test(&req, &done, MPI_STATUS_IGNORE), call);
      if (done) return;
      if (spin < 64) continue;  // most collectives end within microseconds of the last arrival
      answer_roll_calls();
      // An oversubscribed rank hands its core to the ranks it waits for.
      std::this_thread::yield();
      if (timeout > 0 && since(start) > timeout) throw TimeoutError(silent_ranks(call, since(start)));
    }
  }

  // Answers every roll call that has arrived (from a rank whose own wait timed out).
  void answer_roll_calls() {
    for (;;) {
      int flag = 0;
      MPI_Status st;
      MPI_Iprobe(MPI_ANY_SOURCE, ping, roll_call_, &flag, &st);
      if (!flag) return;
      int ignored = 0;
      MPI_Recv(&ignored, 1, MPI_INT, st.MPI_SOURCE, ping, roll_call_, MPI_STATUS_IGNORE);
      MPI_Request r;
      MPI_Isend(&here_, 1, MPI_INT, st.MPI_SOURCE, pong, roll_call_, &r);
      MPI_Request_free(&r);
    }
  }

  // The timeout's message: a roll call of every other rank, answered within a short grace
  // by every rank that is waiting in a collective too.
  std::string silent_ranks(const char* call, double waited) {
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      MPI_Request r;
      MPI_Isend(&here_, 1, MPI_INT, q, ping, roll_call_, &r);
      MPI_Request_free(&r);  // a stopped rank may never take it
    }
    std::vector<char> heard(static_cast<std::size_t>(size_), 0);
    heard[rank_] = 1;
    const double grace = std::min(timeout, 2.0);
    const clock::time_point asked = clock::now();
    int answers = 1;
    while (answers < size_ && since(asked) < grace) {
      answer_roll_calls();
      int flag = 0;
      MPI_Status st;
      MPI_Iprobe(MPI_ANY_SOURCE, pong, roll_call_, &flag, &st);
      if (!flag) {
        std::this_thread::yield();
        continue;
      }
      int ignored = 0;
      MPI_Recv(&ignored, 1, MPI_INT, st.MPI_SOURCE, pong, roll_call_, MPI_STATUS_IGNORE);
      if (!heard[st.MPI_SOURCE]) ++answers;
      heard[st.MPI_SOURCE] = 1;
    }
    std::string silent;
    for (int q = 0; q < size_; ++q)
      if (!heard[q]) silent += (silent.empty() ? "" : ", ") + std::to_string(q);
    const std::string limit = mxd::detail::concat(" (collective timeout ", timeout, " s)");
    if (silent.empty())
      return mxd::detail::concat(call, " did not complete in ", int(waited), " s", limit,
                                 " though every rank answers");
    return mxd::detail::concat("no word from rank", answers < size_ - 1 ? "s " : " ", silent,
                               " in ", int(waited), " s", limit, ": stopped, hung, or not in ",
                               call, " with the others");
  }

  static void check(int rc, const char* call) {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    throw Error(std::string(call) + " failed: " + std::string(text, static_cast<std::size_t>(len)));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm roll_call_ = MPI_COMM_NULL;  // the timeout's questions, apart from any user traffic
  int here_ = 1;                        // the roll call's message (unread)
  int rank_ = 0, size_ = 1;
  bool owns_mpi_ = false;
};

}  // namespace mxd::parallel
