// SPDX-License-Identifier: MIT
// The memory check a command makes before it allocates. Linux grants every allocation that
// fits the address space and kills the process (SIGKILL, no message) once the pages it
// touches exceed what the machine or its cgroup can give, so sizes whose tensors together
// cannot be held are refused up front, with both figures.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>

#include <mxd/error.hpp>
#include <mxd/workspace.hpp>

namespace mxd::cli {

struct AvailableMemory {
  double bytes = std::numeric_limits<double>::infinity();
  std::string source;  // where the figure comes from, for the message
};

namespace memory_detail {

// A cgroup file's number; infinity for "max" (v2), a v1 "no limit" (near 2^63) or no file.
inline double cgroup_value(const std::string& file) {
  std::ifstream f(file);
  std::string v;
  if (!(f >> v) || v == "max") return std::numeric_limits<double>::infinity();
  const double x = std::atof(v.c_str());
  return x >= 0x1p60 ? std::numeric_limits<double>::infinity() : x;
}

// Takes `limit - usage` of cgroup directory `dir` when it is below what `a` has.
inline void take_cgroup(AvailableMemory& a, const std::string& dir, const char* limit_file,
                        const char* usage_file) {
  const double limit = cgroup_value(dir + "/" + limit_file);
  if (!std::isfinite(limit)) return;
  const double left = std::max(0.0, limit - cgroup_value(dir + "/" + usage_file));
  if (left < a.bytes) a = {left, "the cgroup's " + std::string(limit_file) + " less its usage"};
}

}  // namespace memory_detail

/// What this process can still use: the lowest of MemAvailable and, for each memory cgroup
/// above it (v2, or v1's memory controller), its limit less its usage. MXD_MEMORY_AVAILABLE
/// (bytes) replaces the figure: for tests, and for a user who knows better.
inline AvailableMemory available_memory() {
  using namespace memory_detail;
  AvailableMemory a;
  if (const char* v = std::getenv("MXD_MEMORY_AVAILABLE")) return {std::atof(v), "MXD_MEMORY_AVAILABLE"};
  {
    std::ifstream f("/proc/meminfo");
    std::string key;
    double kib = 0;
    while (f >> key >> kib) {
      if (key == "MemAvailable:") {
        a = {kib * 1024.0, "MemAvailable"};
        break;
      }
      f.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
    }
  }
  std::ifstream groups("/proc/self/cgroup");
  std::string line;
  while (std::getline(groups, line)) {
    // "0::/path" (v2) or "N:controller,...:/path" (v1); the path is relative to the mount.
    const auto c1 = line.find(':'), c2 = line.find(':', c1 + 1);
    if (c1 == std::string::npos || c2 == std::string::npos) continue;
    const std::string controllers = "," + line.substr(c1 + 1, c2 - c1 - 1) + ",";
    std::string path = line.substr(c2 + 1);
    const bool v2 = controllers == ",,";
    if (!v2 && controllers.find(",memory,") == std::string::npos) continue;
    const std::string mount = v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/memory";
    // Every level up to the mount's root: a parent's limit binds its children too.
    for (;;) {
      const std::string dir = mount + (path == "/" ? "" : path);
      if (v2) take_cgroup(a, dir, "memory.max", "memory.current");
      else take_cgroup(a, dir, "memory.limit_in_bytes", "memory.usage_in_bytes");
      if (path.empty() || path == "/") break;
      path = path.substr(0, path.find_last_of('/'));
      if (path.empty()) path = "/";
    }
  }
  return a;
}

/// "12.3 GiB", or MiB below one GiB.
inline std::string memory_size(double bytes) {
  char buf[32];
  if (bytes >= 0x1p30) std::snprintf(buf, sizeof buf, "%.1f GiB", bytes / 0x1p30);
  else std::snprintf(buf, sizeof buf, "%.0f MiB", bytes / 0x1p20);
  return buf;
}

/// Throws mxd::Error unless `need` bytes (what `holds` lists) fit in available_memory().
inline void check_memory(double need, const std::string& holds) {
  const AvailableMemory a = available_memory();
  MXD_CHECK(need <= a.bytes, "this run needs ", memory_size(need), " of memory (", holds, ") but ",
            memory_size(a.bytes), " is available (", a.source, "); choose smaller sizes");
}

/// Bytes an MxD's training workspace holds for a batch of `rows` (forward cache, gate-score
/// tile, backward scratch), as Workspace sizes them.
template <class T>
double workspace_bytes(const Config& c, double rows, index_t tile_rows = 0) {
  Workspace<T> ws;
  ws.tile_rows = tile_rows;
  const double tile = double(ws.tile_for(static_cast<index_t>(rows), std::size_t(c.n_experts) * sizeof(T)));
  const double per_row = double(sizeof(T)) * (double(c.d_hidden) * (c.glu ? 6 : 4) + 4.0 * double(c.d_out) +
                                              2.0 * double(c.k)) +
                         8.0 * double(c.k);  // topk_idx and order (int32)
  return rows * per_row + tile * double(c.n_experts) * double(sizeof(T));
}

}  // namespace mxd::cli
