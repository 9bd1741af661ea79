// SPDX-License-Identifier: MIT
// Runner of the CUDA tests. Test suite "gpu" needs a device: without one it is excluded, and
// a run asked for it alone (`--test-suite=gpu`, as ctest does) exits 77, which ctest reports
// as skipped. Nothing touches CUDA before main, so listing test cases needs no GPU either.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>

#include "runs.hpp"

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  bool gpu_suite_only = false;
  for (int i = 1; i < argc; ++i) gpu_suite_only |= std::strcmp(argv[i], "--test-suite=gpu") == 0;
  const bool listing = [&] {
    for (int i = 1; i < argc; ++i)
      if (std::strncmp(argv[i], "--list", 6) == 0 || std::strncmp(argv[i], "-l", 2) == 0) return true;
    return false;
  }();
  if (!listing && mxd_cuda_test::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device is visible (cudaGetDeviceCount found none); the GPU "
                "test suite did not run\n");
    if (gpu_suite_only) return 77;
    context.addFilter("test-suite-exclude", "gpu");
  }
  return context.run();
}
