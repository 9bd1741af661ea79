// SPDX-License-Identifier: MIT
/// @file backend/thread_pool.hpp
/// @brief The host's worker threads: a loop over independent pieces that never waits for a
/// worker to show up.
///
/// The CPU primitives run many short parallel loops per training step. A fork-join runtime
/// (OpenMP) ends each loop at a barrier that every thread of the team must reach, so on a
/// machine shared with other processes one descheduled worker stalls the loop for a scheduler
/// time slice, and its spinning workers take CPU time from everyone else: two threads ran
/// slower than one. Here the calling thread claims pieces from a shared counter and does the
/// work itself; sleeping workers are woken and help if they get a core in time. The caller
/// waits only for pieces a worker has already started. Idle workers spin for a few
/// microseconds (the next loop of a step usually follows at once), then block on a condition
/// variable, so an idle pool costs no CPU.
///
/// Which thread runs a piece never changes what the piece computes: the results do not depend
/// on the number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace mxd::detail {

/// Number of CPUs this process may run on (its affinity mask at first use), at least 1.
inline int available_cpus() {
  static const int n = [] {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return n;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

/// A process-wide pool of helper threads for ThreadPool::run. One loop runs at a time; a loop
/// started while another is running (another user thread, or a loop nested in a piece) runs on
/// its calling thread alone, and so does a loop of more than 4M pieces (far beyond the CPU
/// primitives' loops, whose pieces are 8 or more rows, 256 GEMM rows or columns, or 16384
/// parameters).
class ThreadPool {
public:
  /// The pool, created on first use; its workers are joined at exit.
  static ThreadPool& instance() {
    static ThreadPool pool;
    return pool;
  }

  /// Runs body(i) for every i in [0, n) on the calling thread and up to threads - 1 workers.
  /// Every i must be independent work. Body is any callable taking an index.
  template <class F>
  void run(int threads, std::int64_t n, F& body) {
    if (threads <= 1 || n <= 1 || n > kMaxPieces || !busy_.try_lock()) {
      for (std::int64_t i = 0; i < n; ++i) body(i);
      return;
    }
    std::lock_guard<std::mutex> hold(busy_, std::adopt_lock);
    const int helpers = static_cast<int>(std::min<std::int64_t>({threads - 1, n - 1, kMaxHelpers}));
    ensure_workers(helpers);
    const std::uint64_t gen = publish(n, helpers, &call<F>, &body);
    for (std::int64_t i; (i = claim(gen)) >= 0;) {  // the caller works like any worker
      body(i);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
    wait_done(n);
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

private:
  // A loop is described by next_ = (generation, pieces n, next piece) in one atomic word: a
  // claim succeeds only while the word still names the loop, and a worker reads the loop's
  // body only after a successful claim (the caller cannot move on before that piece is done).
  // A worker that wakes late finds another generation and touches nothing.
  static constexpr int kGenBits = 20, kCountBits = 22;
  static constexpr std::int64_t kMaxPieces = (std::int64_t(1) << kCountBits) - 1;
  static constexpr std::int64_t kMaxHelpers = 0xffff;
  // Idle workers spin this long before they block (a step's loops follow each other closely).
  static constexpr std::chrono::microseconds kSpin{50};

  using Fn = void (*)(void*, std::int64_t);
  template <class F>
  static void call(void* body, std::int64_t i) {
    (*static_cast<F*>(body))(i);
  }

  ThreadPool() = default;

  static std::uint64_t gen_of(std::uint64_t w) { return w >> (2 * kCountBits); }
  static std::int64_t n_of(std::uint64_t w) { return std::int64_t(w >> kCountBits) & kMaxPieces; }
  static std::int64_t next_of(std::uint64_t w) { return std::int64_t(w) & kMaxPieces; }
  // seats_ = (generation << 32 | helpers allowed << 16 | helpers joined).
  static std::uint64_t gen_of_seats(std::uint64_t s) { return s >> 32; }

  std::uint64_t publish(std::int64_t n, int helpers, Fn fn, void* body) {
    const std::uint64_t gen = (gen_of(next_.load(std::memory_order_relaxed)) + 1) &
                              ((std::uint64_t(1) << kGenBits) - 1);
    fn_.store(fn, std::memory_order_relaxed);
    body_.store(body, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    seats_.store(gen << 32 | std::uint64_t(helpers) << 16, std::memory_order_relaxed);
    next_.store(gen << (2 * kCountBits) | std::uint64_t(n) << kCountBits, std::memory_order_release);
    bool sleeping;
    {
      std::lock_guard<std::mutex> lock(mutex_);  // orders the store with a sleeper's check
      sleeping = sleepers_ > 0;
    }
    if (sleeping) wake_.notify_all();
    return gen;
  }

  // The next piece of loop `gen`, or -1 when there is none (or the loop is over).
  std::int64_t claim(std::uint64_t gen) {
    std::uint64_t w = next_.load(std::memory_order_acquire);
    while (gen_of(w) == gen && next_of(w) < n_of(w))
      if (next_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) return next_of(w);
    return -1;
  }

  // At most the allowed number of workers join a loop (its caller asked for that many threads).
  bool take_seat(std::uint64_t gen) {
    std::uint64_t s = seats_.load(std::memory_order_acquire);
    while (gen_of_seats(s) == gen && (s & 0xffff) < ((s >> 16) & 0xffff))
      if (seats_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) return true;
    return false;
  }

  void wait_done(std::int64_t n) {
    const auto t0 = std::chrono::steady_clock::now();
    while (done_.load(std::memory_order_acquire) < n) {
      // A worker is finishing a piece; if it takes long (it lost its core), stop spinning.
      if (std::chrono::steady_clock::now() - t0 > kSpin) std::this_thread::yield();
      else cpu_relax();
    }
  }

  void ensure_workers(int helpers) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_.size()) < helpers) workers_.emplace_back([this] { work(); });
  }

  void work() {
    std::uint64_t seen = gen_of(next_.load(std::memory_order_acquire));
    for (;;) {
      // Wait for a new loop: spin briefly, then sleep.
      std::uint64_t w = next_.load(std::memory_order_acquire);
      const auto t0 = std::chrono::steady_clock::now();
      while (gen_of(w) == seen && std::chrono::steady_clock::now() - t0 < kSpin) {
        cpu_relax();
        w = next_.load(std::memory_order_acquire);
      }
      if (gen_of(w) == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleepers_;
        wake_.wait(lock, [&] {
          return stop_ || gen_of(next_.load(std::memory_order_acquire)) != seen;
        });
        --sleepers_;
        if (stop_) return;
        w = next_.load(std::memory_order_acquire);
      }
      seen = gen_of(w);
      if (!take_seat(seen)) continue;
      for (std::int64_t i; (i = claim(seen)) >= 0;) {
        fn_.load(std::memory_order_relaxed)(body_.load(std::memory_order_relaxed), i);
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex busy_;  // held by the thread whose loop is running
  std::atomic<std::uint64_t> next_{0}, seats_{0};
  std::atomic<std::int64_t> done_{0};
  std::atomic<Fn> fn_{nullptr};
  std::atomic<void*> body_{nullptr};

  std::mutex mutex_;  // guards workers_, sleepers_, stop_
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  int sleepers_ = 0;
  bool stop_ = false;
};

}  // namespace mxd::detail
