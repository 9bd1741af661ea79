// SPDX-License-Identifier: MIT
// Helpers of the mpirun CLI tests (tests/mpi/*.sh):
//   mpi_files compare A B TOL   every tensor of safetensors file B is in A with normwise
//                               relative error <= TOL (checkpoints: weights, AdamW moments)
//   mpi_files data PATH ROWS I O SEED   an activation file: x [ROWS, I] ~ N(0, 1), y = tanh(x W)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <mxd/io/safetensors.hpp>

#include "../testing.hpp"

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  try {
    if (cmd == "compare" && argc == 5) {
      mxd::io::SafetensorsReader a(argv[2]), b(argv[3]);
      const double tol = std::atof(argv[4]);
      int failures = 0, compared = 0;
      for (const std::string& key : b.names()) {
        const auto t = b.info(key).dtype;
        if (t != mxd::io::DType::F16 && t != mxd::io::DType::BF16 && t != mxd::io::DType::F32 &&
            t != mxd::io::DType::F64) {  // counters (the optimizer's step): equal
          ++compared;
          if (a.read_all<std::int64_t>(key, b.info(key).shape) != b.read_all<std::int64_t>(key)) {
            std::fprintf(stderr, "%s: %s differs\n", argv[2], key.c_str());
            ++failures;
          }
          continue;
        }
        const auto vb = b.read_all<double>(key);
        const auto va = a.read_all<double>(key, b.info(key).shape);
        const double e = mxd_test::rel_error(va.data(), vb.data(), vb.size());
        ++compared;
        if (!(e <= tol)) {
          std::fprintf(stderr, "%s: %s relative error %.3e > %.1e\n", argv[2], key.c_str(), e, tol);
          ++failures;
        }
      }
      std::printf("%s: %d tensors compared, %d failures\n", argv[2], compared, failures);
      return failures == 0 && compared > 0 ? 0 : 1;
    }
    if (cmd == "data" && argc == 7) {
      const long rows = std::atol(argv[3]), I = std::atol(argv[4]), O = std::atol(argv[5]);
      std::mt19937_64 rng(std::strtoull(argv[6], nullptr, 10));
      std::normal_distribution<double> n01;
      std::vector<float> x(rows * I), y(rows * O), w(I * O);
      for (auto& v : w) v = float(n01(rng) / std::sqrt(double(I)));
      for (auto& v : x) v = float(n01(rng));
      for (long r = 0; r < rows; ++r)
        for (long o = 0; o < O; ++o) {
          double s = 0;
          for (long i = 0; i < I; ++i) s += double(x[r * I + i]) * double(w[i * O + o]);
          y[r * O + o] = float(std::tanh(s));
        }
      mxd::io::SafetensorsWriter f;
      f.add("x", {rows, I}, x.data());
      f.add("y", {rows, O}, y.data());
      f.write(argv[2]);
      return 0;
    }
    std::fprintf(stderr, "usage: mpi_files compare A B TOL | mpi_files data PATH ROWS I O SEED\n");
    return 2;
  } catch (const mxd::Error& e) {
    std::fprintf(stderr, "mpi_files: %s\n", e.what());
    return 1;
  }
}
