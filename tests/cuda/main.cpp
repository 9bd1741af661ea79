// SPDX-License-Identifier: MIT
// Runner of the CUDA tests. Test suite "gpu" needs a device: where there is no GPU or no
// driver it is excluded, and a run asked for it alone (`--test-suite=gpu`, as ctest does)
// exits 77, which ctest reports as skipped. Any other failure to count the devices (a driver
// too old for the runtime, say) fails a run that includes the suite, naming the CUDA error.
// Nothing touches CUDA before main, so listing test cases needs no GPU either.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <exception>

#include "runs.hpp"

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  bool gpu_suite_only = false, gpu_excluded = false, listing = false;
  for (int i = 1; i < argc; ++i) {
    gpu_suite_only |= std::strcmp(argv[i], "--test-suite=gpu") == 0;
    gpu_excluded |= std::strcmp(argv[i], "--test-suite-exclude=gpu") == 0;
    listing |= std::strncmp(argv[i], "--list", 6) == 0 || std::strncmp(argv[i], "-l", 2) == 0;
  }
  if (!listing && !gpu_excluded) {
    int devices = 0;
    try {
      devices = mxd_cuda_test::device_count();
    } catch (const std::exception& e) {
      std::printf("FAILED: the GPU test suite cannot run: %s\n", e.what());
      return 1;
    }
    if (devices == 0) {
      std::printf("SKIPPED: no CUDA device is visible (cudaGetDeviceCount found none); the GPU "
                  "test suite did not run\n");
      if (gpu_suite_only) return 77;
      context.addFilter("test-suite-exclude", "gpu");
    }
  }
  return context.run();
}
