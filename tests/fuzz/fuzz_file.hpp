// SPDX-License-Identifier: MIT
// Shared by the libFuzzer harnesses: the readers take paths, so each input goes to a file of
// this process's own, and only mxd::Error counts as a clean rejection (anything else, a crash,
// a sanitizer report, an uncaught exception or a huge allocation, is a finding).
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include <mxd/error.hpp>

namespace mxd_fuzz {

/// Writes the input to a per-process scratch file and returns its path.
inline const std::string& as_file(const std::uint8_t* data, std::size_t size) {
  static const std::string path = "/tmp/mxd_fuzz_" + std::to_string(::getpid()) + ".safetensors";
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size) std::fwrite(data, 1, size, f);
  std::fclose(f);
  return path;
}

/// Runs body(path) on the input; mxd::Error is the expected way to refuse it.
template <class Body>
int run(const std::uint8_t* data, std::size_t size, Body&& body) {
  const std::string& path = as_file(data, size);
  try {
    body(path);
  } catch (const mxd::Error&) {
  }
  return 0;
}

}  // namespace mxd_fuzz
