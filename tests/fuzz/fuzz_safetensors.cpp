// SPDX-License-Identifier: MIT
// libFuzzer: the safetensors reader. Opens the input, then reads every tensor it lists (as
// float or integer by its dtype) and every metadata entry.
#include <mxd/io/safetensors.hpp>

#include "fuzz_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return mxd_fuzz::run(data, size, [](const std::string& path) {
    mxd::io::SafetensorsReader f(path);
    std::size_t sink = f.metadata().size();
    for (const std::string& name : f.names()) {
      const mxd::io::TensorInfo& t = f.info(name);
      sink += static_cast<std::size_t>(t.numel());
      if (mxd::io::detail::is_float(t.dtype)) sink += f.read_all<double>(name).size();
      else sink += f.read_all<std::int64_t>(name).size();
    }
    if (sink == 0xdeadbeef) std::abort();  // keeps the reads from being optimised away
  });
}
