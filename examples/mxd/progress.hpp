// SPDX-License-Identifier: MIT
// Training progress on stderr: a bar redrawn in place on a terminal, and elsewhere (batch
// jobs, CI, cluster logs) one line every few seconds. tokens/s is each model's rows trained
// per second of its own training steps: the definition of the final table's tokens/s.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <mxd/tensor.hpp>

namespace mxd::cli {

/// One model's state after a step: its last loss and the seconds spent in its steps so far.
struct ModelProgress {
  std::string name;
  double loss, train_seconds;
};

class Progress {
public:
  /// Steps [start, total) are to run; off a terminal a line is printed when `every_s` seconds
  /// have passed since the last one (0: after every step) and after the last step.
  Progress(index_t total, index_t start, double every_s, std::string label = "")
      : total_(total), start_(start), every_(every_s), label_(std::move(label)),
        tty_(isatty(2)) {}

  /// After step `step` (0-based) of `rows_per_step` rows each.
  void update(index_t step, index_t rows_per_step, const std::vector<ModelProgress>& models) {
    const double s = seconds();
    const bool last = step + 1 == total_;
    if (!last && s - last_ < (tty_ ? 0.2 : every_)) return;
    last_ = s;
    const double done = double(step + 1 - start_), rows = done * double(rows_per_step);
    const double eta = double(total_ - step - 1) * s / std::max(done, 1.0);
    std::string line = label_ + "step " + std::to_string(step + 1) + "/" + std::to_string(total_);
    char buf[160];
    for (const ModelProgress& m : models) {
      std::snprintf(buf, sizeof buf, "  %s loss %.4g %.0f tok/s", m.name.c_str(), m.loss,
                    rows / std::max(m.train_seconds, 1e-9));
      line += buf;
    }
    std::snprintf(buf, sizeof buf, "  ETA %.0fs", eta);
    line += buf;
    if (tty_) {
      const int width = 20, filled = int(width * double(step + 1) / double(total_));
      std::fprintf(stderr, "\r[%s%s] %s ", std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), line.c_str());
      if (last) std::fputc('\n', stderr);
    } else {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    std::fflush(stderr);
  }

  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

private:
  index_t total_, start_;
  double every_;
  std::string label_;
  bool tty_;
  double last_ = 0;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

}  // namespace mxd::cli
