// SPDX-License-Identifier: MIT
// libFuzzer: activation files (x [T, d_in], y [T, d_out]) as `mxd train --data` streams them:
// index, shuffle, a few training batches and the held-out rows.
#include <algorithm>

#include <mxd/train/data.hpp>

#include "fuzz_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return mxd_fuzz::run(data, size, [](const std::string& path) {
    mxd::train::ActivationFiles<float> src({path}, 0.05, 1);
    mxd::Tensor<float> x, y;
    for (std::uint64_t step = 0; step < 3; ++step) src.train_batch(step, 4, x, y);
    src.eval_batch(0, std::min<mxd::index_t>(src.eval_rows(), 16), x, y);
  });
}
