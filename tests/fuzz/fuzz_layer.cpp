// SPDX-License-Identifier: MIT
// libFuzzer: layer and checkpoint loading. The input is read as an MxD layer (config, every
// parameter, and a forward pass over its `x` when it has one), as an MxD checkpoint (optimizer
// state) and as a transcoder checkpoint.
#include <mxd/baselines/transcoder.hpp>
#include <mxd/io/checkpoint.hpp>
#include <mxd/mxd.hpp>

#include "fuzz_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  mxd_fuzz::run(data, size, [](const std::string& path) {
    mxd::io::SafetensorsReader f(path);
    const mxd::Config c = mxd::io::read_config(f);
    mxd::Params<float> p = mxd::io::load_params<float>(f, c);
    if (f.contains("x")) {
      const mxd::Tensor<float> x = mxd::io::read_matrix<float>(f, "x", c.d_in);
      if (x.rows() > 0) {
        mxd::Tensor<float> y(x.rows(), c.d_out);
        mxd::Workspace<float> ws;
        ws.ctx.threads = 1;
        mxd::forward(p, x.view(), y.view(), ws);
      }
    }
    mxd::AdamW<float> opt(p, mxd::AdamWConfig{});
    mxd::io::load_optimizer(f, opt);
  });
  return mxd_fuzz::run(data, size, [](const std::string& path) {
    mxd::io::SafetensorsReader f(path);
    const mxd::TranscoderConfig c = mxd::io::read_transcoder_config(f);
    mxd::TranscoderParams<float> p = mxd::io::load_transcoder<float>(f, c);
    mxd::AdamW<float, mxd::cpu, mxd::TranscoderParams<float>> opt(p, mxd::AdamWConfig{});
    mxd::io::load_optimizer(f, opt);
  });
}
