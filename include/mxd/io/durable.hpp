// SPDX-License-Identifier: MIT
/// @file io/durable.hpp
/// @brief Durable file replacement: fsync a file and its directory, so that after a crash or
/// a power cut a renamed file is either the old one or the complete new one.
///
///     write "f.tmp";  mxd::io::sync_file("f.tmp");  rename("f.tmp", "f");  mxd::io::sync_dir(".");
#pragma once

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "../error.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#define MXD_HAS_FSYNC 1
#endif

namespace mxd::io {

namespace detail {

#if defined(MXD_HAS_FSYNC)
inline void fsync_path(const std::string& path, int flags, const char* what) {
  const int fd = ::open(path.c_str(), flags);
  MXD_CHECK(fd >= 0, "cannot open ", what, " '", path, "' to sync it: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems cannot sync a directory (EINVAL): nothing more can be done there.
  MXD_CHECK(rc == 0 || err == EINVAL, "fsync of ", what, " '", path, "' failed: ",
            std::strerror(err));
}
#endif

}  // namespace detail

/// The directory holding `path` ("." for a bare file name).
inline std::string parent_dir(const std::string& path) {
  const std::string p = std::filesystem::path(path).parent_path().string();
  return p.empty() ? std::string(".") : p;
}

/// Flushes a written file's data to the storage device (a no-op where POSIX fsync is missing).
inline void sync_file(const std::string& path) {
#if defined(MXD_HAS_FSYNC)
  detail::fsync_path(path, O_RDONLY, "file");
#else
  (void)path;
#endif
}

/// Flushes a directory's entries (renames, new files) to the storage device.
inline void sync_dir(const std::string& dir) {
#if defined(MXD_HAS_FSYNC)
  detail::fsync_path(dir.empty() ? std::string(".") : dir, O_RDONLY | O_DIRECTORY, "directory");
#else
  (void)dir;
#endif
}

/// Writes `bytes` to `path` through a synced temporary file and a rename, then syncs the
/// directory: readers see the old contents or the complete new ones, even after a crash.
inline void write_file_durable(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    MXD_CHECK(out.good(), "cannot open '", tmp, "' for writing: ", std::strerror(errno));
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    MXD_CHECK(out.good(), "writing '", tmp, "' failed");
  }
  sync_file(tmp);
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  MXD_CHECK(!ec, "cannot rename '", tmp, "' to '", path, "': ", ec.message());
  sync_dir(parent_dir(path));
}


}  // namespace mxd::io
