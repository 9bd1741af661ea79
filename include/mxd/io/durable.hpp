// SPDX-License-Identifier: MIT
/// @file io/durable.hpp
/// @brief The one way mxd writes files: through a temporary beside the target, every write and
/// the close checked, fsynced, then renamed over it (and the directory synced), so that after
/// a failure, a kill, a crash or a power cut a file is either the old one or the complete new
/// one, and a full disk is an error naming the file and the errno, never an empty file.
///
///     mxd::io::write_file_durable("metrics.json", text);
///     mxd::io::DurableFile f("big.bin");  f.write(p, n);  f.write(q, m);  f.commit();
///     mxd::io::AppendFile log("log.csv");  log.append("10,0.5\n");  log.sync();
#pragma once

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "../error.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#define MXD_HAS_FSYNC 1
#endif

namespace mxd::io {

/// An mxd::Error raised by the file system, with its errno (ENOSPC: the disk is full).
class IoError : public Error {
public:
  IoError(const std::string& message, int code) : Error(message), code(code) {}
  /// "WHAT: the errno's text".
  static IoError failed(const std::string& what, int code) {
    return IoError(what + ": " + std::strerror(code), code);
  }
  int code;
};

namespace detail {

#if defined(MXD_HAS_FSYNC)
inline void fsync_path(const std::string& path, int flags, const char* what) {
  const int fd = ::open(path.c_str(), flags);
  if (fd < 0) throw IoError::failed(std::string("cannot open ") + what + " '" + path + "' to sync it", errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems cannot sync a directory (EINVAL): nothing more can be done there.
  if (rc != 0 && err != EINVAL) throw IoError::failed(std::string("fsync of ") + what + " '" + path + "' failed", err);
}
#endif

inline const char* file_type_name(std::filesystem::file_type t) {
  using ft = std::filesystem::file_type;
  switch (t) {
    case ft::directory: return "a directory";
    case ft::fifo: return "a FIFO";
    case ft::socket: return "a socket";
    case ft::character: return "a character device";
    case ft::block: return "a block device";
    default: return "not a plain file";
  }
}

}  // namespace detail

/// The directory holding `path` ("." for a bare file name).
inline std::string parent_dir(const std::string& path) {
  const std::string p = std::filesystem::path(path).parent_path().string();
  return p.empty() ? std::string(".") : p;
}

/// Whether `path` (through links) is a regular file: false when nothing is there, an error
/// naming what is there otherwise. Called before a file is opened, so that a directory is a
/// clear error and a FIFO or a device cannot block the reader.
inline bool regular_file_exists(const std::string& path) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (st.type() == std::filesystem::file_type::not_found) return false;
  MXD_CHECK(!ec, "cannot stat '", path, "': ", ec.message());
  MXD_CHECK(st.type() == std::filesystem::file_type::regular, "'", path,
            "' is not a regular file (it is ", detail::file_type_name(st.type()), ")");
  return true;
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

/// A file written as PATH.tmp and renamed over PATH by commit(); destroyed before commit()
/// (an error, an exception elsewhere), it removes PATH.tmp and PATH is untouched.
class DurableFile {
public:
  explicit DurableFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
    errno = 0;
    f_ = std::fopen(tmp_.c_str(), "wb");
    if (!f_) throw IoError::failed("cannot open '" + tmp_ + "' for writing", errno ? errno : EIO);
  }
  DurableFile(const DurableFile&) = delete;
  DurableFile& operator=(const DurableFile&) = delete;
  ~DurableFile() {
    if (f_) std::fclose(f_);
    if (!committed_) std::remove(tmp_.c_str());
  }

  void write(const void* data, std::size_t n) {
    errno = 0;
    if (n > 0 && std::fwrite(data, 1, n, f_) != n) fail("writing");
  }
  void write(const std::string& s) { write(s.data(), s.size()); }

  /// Flushes, syncs and closes the temporary (each checked: a full disk often shows only
  /// there), renames it over the path and syncs the directory.
  void commit() {
    errno = 0;
    if (std::fflush(f_) != 0) fail("writing");
#if defined(MXD_HAS_FSYNC)
    if (::fsync(::fileno(f_)) != 0) fail("syncing");
#endif
    std::FILE* f = f_;
    f_ = nullptr;
    errno = 0;
    if (std::fclose(f) != 0) fail("closing");
    std::error_code ec;
    std::filesystem::rename(tmp_, path_, ec);
    if (ec) throw IoError::failed("cannot rename '" + tmp_ + "' to '" + path_ + "'", ec.value());
    committed_ = true;
    sync_dir(parent_dir(path_));
  }

private:
  [[noreturn]] void fail(const char* doing) {
    throw IoError::failed(std::string(doing) + " '" + tmp_ + "' failed", errno ? errno : EIO);
  }

  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
  bool committed_ = false;
};

/// Writes `bytes` to `path` through a DurableFile: readers see the old contents or the
/// complete new ones, even after a crash.
inline void write_file_durable(const std::string& path, const std::string& bytes) {
  DurableFile f(path);
  f.write(bytes);
  f.commit();
}

/// A file that grows by whole records (a log read while it is written): each append() reaches
/// the file at once, checked; sync() makes everything appended so far durable.
class AppendFile {
public:
  AppendFile() = default;
  explicit AppendFile(const std::string& path) : path_(path) {
    errno = 0;
    f_ = std::fopen(path.c_str(), "ab");
    if (!f_) throw IoError::failed("cannot open '" + path + "' for appending", errno ? errno : EIO);
  }
  AppendFile(AppendFile&& o) noexcept : path_(std::move(o.path_)), f_(o.f_) { o.f_ = nullptr; }
  AppendFile& operator=(AppendFile&& o) noexcept {
    std::swap(path_, o.path_);
    std::swap(f_, o.f_);
    return *this;
  }
  ~AppendFile() {
    if (f_) std::fclose(f_);
  }

  bool is_open() const { return f_ != nullptr; }
  void append(const std::string& s) {
    errno = 0;
    if (std::fwrite(s.data(), 1, s.size(), f_) != s.size() || std::fflush(f_) != 0)
      throw IoError::failed("appending to '" + path_ + "' failed", errno ? errno : EIO);
  }
  void sync() {
#if defined(MXD_HAS_FSYNC)
    if (::fsync(::fileno(f_)) != 0) throw IoError::failed("syncing '" + path_ + "' failed", errno);
#endif
  }
  /// Syncs and closes the file, both checked.
  void close() {
    sync();
    std::FILE* f = f_;
    f_ = nullptr;
    errno = 0;
    if (std::fclose(f) != 0) throw IoError::failed("closing '" + path_ + "' failed", errno ? errno : EIO);
  }

private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

}  // namespace mxd::io
