// SPDX-License-Identifier: MIT
// SIGINT and SIGTERM during `mxd train`. The first one only sets a flag that the training
// loop reads after each step: it then commits a checkpoint and the process ends with 128 +
// the signal (130, 143). A second one ends the process at once, as if mxd did not catch it.
//
// Under mpirun the ranks agree on the flag every step, so all of them stop at the same step
// and commit together. OpenMPI's launcher answers its own SIGINT or SIGTERM (and a rank's
// death or MPI_Abort) with SIGTERM to every rank and SIGKILL odls_base_sigkill_timeout
// seconds later (default 1): a rank that has not ended shortly before then says why, since
// the SIGKILL leaves no chance to.
#pragma once

#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <mxd/config.hpp>

namespace mxd::cli {

/// Thrown once training has committed a checkpoint after a stop signal; run_train reports
/// it and returns 128 + signal. Not an mxd::Error: nothing failed.
struct Interrupted {
  int signal;
  index_t step;       // steps done, the committed checkpoint's
  index_t sweep_k;    // in a k sweep, the k being trained (such a run cannot be resumed); else 0
  std::string out;    // --out
};

namespace stop_detail {
inline volatile sig_atomic_t received = 0;
inline volatile sig_atomic_t from_launcher = 0;
inline timer_t launcher_deadline;
inline itimerspec launcher_grace{};
inline bool under_launcher = false;  // the parent is OpenMPI's launcher and the deadline is armed

inline void on_stop_signal(int sig, siginfo_t* info, void*) {
  if (received) {  // the second: what the signal does when nobody catches it
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  received = sig;
  if (under_launcher && info && info->si_pid == getppid()) {
    from_launcher = 1;
    timer_settime(launcher_deadline, 0, &launcher_grace, nullptr);
  }
}

inline void on_launcher_deadline(int) {
  static const char msg[] =
      "mxd: error: this rank was stopped by the launcher (another rank failed or was killed, or "
      "mpirun was interrupted) before it could finish its step and commit a checkpoint\n";
  ssize_t ignored = ::write(2, msg, sizeof msg - 1);
  (void)ignored;
  _exit(1);
}
}  // namespace stop_detail

/// Catches SIGINT and SIGTERM as the file comment says.
inline void install_stop_signals() {
  using namespace stop_detail;
  if (std::getenv("OMPI_COMM_WORLD_SIZE")) {
    double kill_delay = 1;
    if (const char* v = std::getenv("OMPI_MCA_odls_base_sigkill_timeout")) kill_delay = std::atof(v);
    // A quarter of a second before the SIGKILL (a quarter of the delay when it is shorter).
    const double grace = kill_delay - std::min(0.25, kill_delay / 4);
    struct sigaction deadline {};
    deadline.sa_handler = on_launcher_deadline;
    sigemptyset(&deadline.sa_mask);
    sigevent ev{};
    ev.sigev_notify = SIGEV_SIGNAL;
    ev.sigev_signo = SIGALRM;
    if (grace > 0 && sigaction(SIGALRM, &deadline, nullptr) == 0 &&
        timer_create(CLOCK_MONOTONIC, &ev, &launcher_deadline) == 0) {
      launcher_grace.it_value.tv_sec = static_cast<time_t>(grace);
      launcher_grace.it_value.tv_nsec = static_cast<long>((grace - std::floor(grace)) * 1e9);
      under_launcher = true;
    }
  }
  struct sigaction stop {};
  stop.sa_sigaction = on_stop_signal;
  stop.sa_flags = SA_SIGINFO | SA_RESTART;  // file writes in progress go on
  sigemptyset(&stop.sa_mask);
  for (int sig : {SIGINT, SIGTERM}) {
    // A signal the parent ignores stays ignored (a shell's background job ignores SIGINT).
    struct sigaction old {};
    if (sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) continue;
    sigaction(sig, &stop, nullptr);
  }
}

/// The first stop signal received (SIGINT or SIGTERM), 0 while none has come.
inline int stop_signal() { return stop_detail::received; }

/// Once the interrupted run's checkpoint is committed and reported: when the stop came from
/// the launcher it is ending the job and would not answer MPI_Finalize (the rank would wait
/// there for its SIGKILL), so the process ends now; otherwise the deadline is disarmed.
inline void end_of_interrupted_run(int status) {
  if (stop_detail::from_launcher) {
    std::fflush(nullptr);
    _exit(status);
  }
  if (!stop_detail::under_launcher) return;
  const itimerspec off{};
  timer_settime(stop_detail::launcher_deadline, 0, &off, nullptr);
}

}  // namespace mxd::cli
