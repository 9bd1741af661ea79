// SPDX-License-Identifier: MIT
// The tool's side of multi-process training (`mxd train --parallel data|experts` under
// mpirun): starting the communicator before anything can fail, the check that every rank was
// given the same command, and the error policy (an error every rank agreed on is printed by
// each rank as usual; any other exception one rank saw, in the middle of a collective
// sequence the others already wait in, is printed and ends every rank through the launcher).
#pragma once

#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>

#include <mxd/parallel/communicator.hpp>
#if defined(MXD_HAS_MPI)
#include <mxd/parallel/mpi.hpp>
#endif

#include "cli.hpp"
#include "signals.hpp"

namespace mxd::cli {

enum class Parallel { none, data, experts };

struct Dist {
  std::unique_ptr<parallel::Communicator> comm;
  Parallel mode = Parallel::none;
  // True while every rank runs the same local code on the same command line (option
  // parsing): an error there is every rank's, and each may report it and end normally.
  bool same_everywhere = false;
  int rank() const { return comm ? comm->rank() : 0; }
  int size() const { return comm ? comm->size() : 1; }
  bool root() const { return rank() == 0; }
};

// The value of --parallel on the command line ("" when absent), read before the full parse
// so that MPI is started first.
inline std::string parallel_arg(int argc, char** argv) {
  std::string v;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--parallel" && i + 1 < argc) v = argv[i + 1];
    else if (a.rfind("--parallel=", 0) == 0) v = a.substr(11);
  }
  return v;
}

// How many processes a launcher started for this job (1 when none did).
inline int launched_processes() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"}) {
    if (const char* v = std::getenv(var)) {
      const int n = std::atoi(v);
      if (n > 0) return n;
    }
  }
  return 1;
}

// How many of this job's processes the launcher started on this machine (1 when unknown).
inline int ranks_on_this_machine() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"}) {
    if (const char* v = std::getenv(var)) {
      const int n = std::atoi(v);
      if (n > 0) return n;
    }
  }
  return 1;
}

// Seconds a collective waits for a silent rank until --timeout is read (its default).
inline constexpr double default_timeout = 600;

// Starts the communicator for --parallel MODE (MPI where built with it, else this process
// alone). Without --parallel, a job that a launcher started as several processes is refused
// (each would train the whole job and write the same files).
inline Dist start_dist(int argc, char** argv) {
  Dist d;
  const std::string mode = parallel_arg(argc, argv);
  if (mode.empty()) {
    const int n = launched_processes();
    MXD_CHECK(n == 1, "started as ", n, " processes without --parallel: add --parallel data or "
              "--parallel experts (or start one process)");
    return d;
  }
  MXD_CHECK(mode == "data" || mode == "experts", "--parallel = '", mode, "' is not data or experts");
  d.mode = mode == "data" ? Parallel::data : Parallel::experts;
#if defined(MXD_HAS_MPI)
  d.comm = std::make_unique<parallel::MpiCommunicator>(&argc, &argv);
  d.comm->timeout = default_timeout;
#else
  MXD_CHECK(launched_processes() == 1, "--parallel: this mxd was built without MPI (configure "
            "with -DMXD_MPI=ON, OpenMPI installed), so it cannot join ", launched_processes(),
            " processes");
  d.comm = std::make_unique<parallel::SelfCommunicator>();
#endif
  return d;
}

// Runs f() under the error policy of the file comment; returns its status. An exception
// that is not an mxd::Error (a file system error, bad_alloc) is one rank's by nature: letting
// it unwind would leave this rank in MPI_Finalize and the others in a collective, forever.
template <class F>
int run_distributed(Dist& d, F&& f) {
  std::string cause;
  try {
    return f();
  } catch (const Interrupted&) {
    throw;  // every rank stops at the same step
  } catch (const Error& e) {
    if (d.size() == 1 || d.comm->failed_together || d.same_everywhere) throw;  // every rank reports it
    cause = e.what();
  } catch (const std::bad_alloc&) {
    if (d.size() == 1) throw;
    cause = "out of memory";
  } catch (const std::exception& e) {
    if (d.size() == 1) throw;
    cause = e.what();
  } catch (...) {
    if (d.size() == 1) throw;
    cause = "an exception that is not a std::exception";
  }
  std::fprintf(stderr, "mxd: error: rank %d: %s (ending every rank)\n", d.rank(),
               one_line(cause.c_str()).c_str());
  std::fflush(stderr);
  d.comm->abort(1);
  return 1;  // not reached: abort() ends the process
}

// Runs f(); under --parallel an mxd::Error it throws on any rank is thrown on all of them.
template <class F>
void together(Dist& d, F&& f) {
  if (d.comm) d.comm->together(f);
  else f();
}

// Peak resident memory of this process, bytes.
inline double peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) * 1024.0;
}

}  // namespace mxd::cli
