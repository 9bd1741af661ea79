// SPDX-License-Identifier: MIT
/// @file dist/mpi.hpp
/// @brief dist::MpiCommunicator: the Communicator over MPI (link mxd::mpi).
///
///     int main(int argc, char** argv) {
///       mxd::dist::MpiCommunicator comm(&argc, &argv);   // MPI_Init unless already done
///       ...                                              // comm.rank(), comm.all_reduce(...)
///     }                                                  // MPI_Finalize if it initialised MPI
///
/// Every MPI call returns its error (MPI_ERRORS_RETURN on a private duplicate of
/// MPI_COMM_WORLD) and becomes an mxd::Error naming the call. Counts are MPI's ints: a single
/// message of more than 2^31 - 1 elements is refused with an error naming its size.
#pragma once

#include <climits>
#include <string>
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

namespace mxd::dist {

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
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  ~MpiCommunicator() override {
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
    check(MPI_Alltoallv(send, sc.data(), sd.data(), mpi_type(t), recv, rc.data(), rd.data(),
                        mpi_type(t), comm_),
          "MPI_Alltoallv");
  }
  void all_gather_raw(const void* send, index_t count, void* recv, const index_t* counts,
                      Type t) override {
    std::vector<int> rc, rd;
    ints(counts, rc, rd, "MPI_Allgatherv");
    check(MPI_Allgatherv(send, int(count), mpi_type(t), recv, rc.data(), rd.data(), mpi_type(t),
                         comm_),
          "MPI_Allgatherv");
  }
  void gather_raw(const void* send, index_t count, void* recv, const index_t* counts, Type t,
                  int root) override {
    std::vector<int> rc, rd;
    ints(counts, rc, rd, "MPI_Gatherv");
    check(MPI_Gatherv(send, int(count), mpi_type(t), recv, rc.data(), rd.data(), mpi_type(t),
                      root, comm_),
          "MPI_Gatherv");
  }
  void broadcast_raw(void* data, index_t count, Type t, int root) override {
    MXD_CHECK(count <= INT_MAX, "MPI_Bcast: ", count, " elements exceed MPI's int counts");
    check(MPI_Bcast(data, int(count), mpi_type(t), root, comm_), "MPI_Bcast");
  }
  int all_min(int v) override {
    int out = v;
    check(MPI_Allreduce(&v, &out, 1, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce");
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
  static void check(int rc, const char* call) {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    throw Error(std::string(call) + " failed: " + std::string(text, static_cast<std::size_t>(len)));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  bool owns_mpi_ = false;
};

}  // namespace mxd::dist
