// SPDX-License-Identifier: MIT
// The host's worker threads (backend/thread_pool.hpp): every piece runs exactly once, whatever
// the thread count, when workers are asleep, in nested loops and with concurrent callers.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include <mxd/backend/thread_pool.hpp>

namespace {

// Runs a loop of n pieces on `threads` threads; true if every piece ran exactly once.
bool each_once(int threads, std::int64_t n) {
  std::vector<std::atomic<int>> runs(static_cast<std::size_t>(n));
  for (auto& r : runs) r = 0;
  auto body = [&](std::int64_t i) { runs[static_cast<std::size_t>(i)].fetch_add(1); };
  mxd::detail::ThreadPool::instance().run(threads, n, body);
  for (auto& r : runs)
    if (r != 1) return false;
  return true;
}

}  // namespace

TEST_CASE("thread pool: every piece runs exactly once for 1 to 8 threads and any piece count") {
  for (int threads : {1, 2, 3, 8})
    for (std::int64_t n : {0, 1, 2, 7, 1000}) {
      CAPTURE(threads);
      CAPTURE(n);
      CHECK(each_once(threads, n));
    }
}

TEST_CASE("thread pool: loops after idle gaps (workers asleep) still run every piece once") {
  for (int round = 0; round < 5; ++round) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // past the workers' spin
    CHECK(each_once(2, 64));
  }
}

TEST_CASE("thread pool: a loop inside a piece runs on its caller, without deadlock") {
  std::atomic<int> inner{0};
  auto body = [&](std::int64_t) {
    auto nested = [&](std::int64_t) { inner.fetch_add(1); };
    mxd::detail::ThreadPool::instance().run(2, 10, nested);
  };
  mxd::detail::ThreadPool::instance().run(2, 20, body);
  CHECK(inner == 200);
}

TEST_CASE("thread pool: two user threads running loops at once each get all their pieces") {
  std::atomic<int> failures{0};
  auto user = [&] {
    for (int i = 0; i < 300; ++i)
      if (!each_once(2, 50)) failures.fetch_add(1);
  };
  std::thread a(user), b(user);
  a.join();
  b.join();
  CHECK(failures == 0);
}
