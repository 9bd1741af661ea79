// SPDX-License-Identifier: MIT
// mxd train: the --out folder: its lock, the refusal to replace an earlier run, and log.csv as training goes.
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <mxd/io/durable.hpp>

#include "../svg.hpp"
#include "options.hpp"

namespace mxd::cli::training {

// The exclusive lock on --out for the whole run: flock(2) on DIR/.lock, which names the
// holder. Two runs writing one folder would remove each other's checkpoint sets; the kernel
// drops the lock when the process ends, however it ends, so a killed run never blocks the next.
class OutLock {
public:
  explicit OutLock(const std::string& out) {
    const std::string path = (std::filesystem::path(out) / ".lock").string();
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    MXD_CHECK(fd_ >= 0, "--out = '", out, "' is not writable: cannot create ", path, ": ",
              std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      char buf[256] = {};
      const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
      std::string holder(buf, n > 0 ? std::size_t(n) : 0);
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
      ::close(fd_);
      fd_ = -1;
      MXD_CHECK(err != EWOULDBLOCK, "--out = '", out, "' is in use by another mxd train (",
                holder.empty() ? std::string("holder unknown") : detail::printable(holder),
                ", holding ", path, "): give another --out");
      throw io::IoError::failed("cannot lock " + path, err);
    }
    char host[256] = {};
    if (::gethostname(host, sizeof host - 1) != 0) std::snprintf(host, sizeof host, "unknown");
    const std::string who = detail::concat("pid ", ::getpid(), " on host ", host, "\n");
    const bool named = ::ftruncate(fd_, 0) == 0 && ::pwrite(fd_, who.data(), who.size(), 0) > 0;
    (void)named;  // best effort: the lock does not depend on it, only a refused run's message
  }
  OutLock(const OutLock&) = delete;
  OutLock& operator=(const OutLock&) = delete;
  ~OutLock() {
    if (fd_ >= 0) ::close(fd_);
  }

private:
  int fd_ = -1;
};

// An earlier run's checkpoint manifests in `out` (checkpoint.json, checkpoint_kK.json for a k
// sweep); one that is not a regular file is an error.
inline std::vector<std::string> earlier_manifests(const std::string& out) {
  namespace fs = std::filesystem;
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(out, ec)) {
    const std::string n = e.path().filename().string();
    const bool manifest =
        n == "checkpoint.json" ||
        (n.rfind("checkpoint_k", 0) == 0 && n.size() > 17 && n.compare(n.size() - 5, 5, ".json") == 0 &&
         n.substr(12, n.size() - 17).find_first_not_of("0123456789") == std::string::npos);
    if (manifest && io::regular_file_exists(e.path().string())) found.push_back(e.path().string());
  }
  MXD_CHECK(!ec, "--out = '", out, "': cannot list the directory: ", ec.message());
  return found;
}

// Creates --out and locks it, before any training. A fresh run (no --resume) into a folder
// that holds an earlier run's checkpoints would replace them: refused unless --overwrite.
inline std::unique_ptr<OutLock> prepare_out_dir(const Options& o) {
  namespace fs = std::filesystem;
  const std::string& out = o.out;
  std::error_code ec;
  fs::create_directories(out, ec);
  MXD_CHECK(!ec, "--out = '", out, "': cannot create the directory: ", ec.message());
  MXD_CHECK(fs::is_directory(out), "--out = '", out, "' is not a directory");
  auto lock = std::make_unique<OutLock>(out);
  const std::vector<std::string> earlier = earlier_manifests(out);
  MXD_CHECK(earlier.empty() || !o.resume.empty() || o.overwrite, "--out = '", out,
            "' holds an earlier run's checkpoints (", earlier.front(), "): give --resume ", out,
            " to continue it, --overwrite to replace it, or another --out");
  return lock;
}

// One log.csv row: the step, then each model's mean loss over the steps since the last row.
inline std::string csv_row(index_t step, const std::vector<double>& values) {
  std::string row = std::to_string(static_cast<long long>(step));
  char buf[64];
  for (double v : values) {
    std::snprintf(buf, sizeof buf, ",%.8g", v);
    row += buf;
  }
  return row + "\n";
}

// log.csv as training goes: each row appended and flushed at once (a killed run keeps its
// rows), synced with each checkpoint. A resumed run continues the log beside its checkpoint:
// its rows up to the resumed step, then the new ones, so the file and the curves drawn from
// it cover the whole training. Inactive (every call a no-op) until open().
class TrainLog {
public:
  // Starts `path` with the header "step,NAME..."; when resuming from step `start`, with the
  // rows of `previous` up to it first, whose losses are also appended to `curves` (one per
  // name).
  void open(const std::string& path, const std::vector<std::string>& names, index_t start,
            const std::string& previous, const std::vector<Series*>& curves) {
    std::string header = "step";
    for (const auto& n : names) header += "," + n;
    header += "\n";
    std::string text = header;
    if (start > 0) text += previous_rows(previous, header, start, curves);
    io::write_file_durable(path, text);
    file_ = io::AppendFile(path);
  }
  void add(index_t step, const std::vector<double>& values) {
    if (file_.is_open()) file_.append(csv_row(step, values));
  }
  void sync() {
    if (file_.is_open()) file_.sync();
  }
  void close() {
    if (file_.is_open()) file_.close();
  }

private:
  static std::string previous_rows(const std::string& previous, const std::string& header,
                                   index_t start, const std::vector<Series*>& curves) {
    if (!io::regular_file_exists(previous)) return "";
    std::ifstream in(previous, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), {});
    if (text.compare(0, header.size(), header) != 0) {
      std::fprintf(stderr, "mxd: note: %s is not this model's log (another header); log.csv "
                           "starts at step %lld\n", previous.c_str(), static_cast<long long>(start));
      return "";
    }
    std::string kept;
    std::size_t at = header.size();
    for (std::size_t end; (end = text.find('\n', at)) != std::string::npos; at = end + 1) {
      const std::string line = text.substr(at, end - at);
      char* p = nullptr;
      const long long step = std::strtoll(line.c_str(), &p, 10);
      std::vector<double> v;
      while (*p == ',') v.push_back(std::strtod(p + 1, &p));
      // A row cut short (a crash while it was written) or past the resumed step ends the log.
      if (*p != '\0' || p == line.c_str() || v.size() != curves.size() || step > start) break;
      kept += line + "\n";
      for (std::size_t c = 0; c < curves.size(); ++c) {
        curves[c]->x.push_back(double(step));
        curves[c]->y.push_back(v[c]);
      }
    }
    return kept;
  }

  io::AppendFile file_;
};

// A k sweep's log.csv: the step column, then one per model and k (NaN where a model has no row).
inline void write_sweep_log(const std::string& path, const std::vector<std::string>& names,
                     const std::vector<std::vector<double>>& cols) {
  std::string csv = "step";
  for (const auto& n : names) csv += "," + n;
  csv += "\n";
  for (std::size_t i = 0; !cols.empty() && i < cols[0].size(); ++i) {
    std::vector<double> values;
    for (std::size_t c = 1; c < cols.size(); ++c) values.push_back(i < cols[c].size() ? cols[c][i] : NAN);
    csv += csv_row(static_cast<index_t>(cols[0][i]), values);
  }
  io::write_file_durable(path, csv);
}

}  // namespace mxd::cli::training
