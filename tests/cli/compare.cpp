// SPDX-License-Identifier: MIT
// mxd_compare OUT EXPECTED TOL: checks that every output tensor of `mxd eval` in EXPECTED
// (y, topk_*, grad.*, loss_nmse_ref, dloss_dy) is in OUT with normwise relative error <= TOL;
// topk_indices are compared only where the expected topk_values are positive.
#include <cstdio>
#include <cstdlib>
#include <string>

#include <mxd/io/safetensors.hpp>

#include "../testing.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: mxd_compare OUT EXPECTED TOL\n");
    return 2;
  }
  try {
    mxd::io::SafetensorsReader out(argv[1]), ref(argv[2]);
    const double tol = std::atof(argv[3]);
    int failures = 0, compared = 0;
    for (const std::string& key : ref.names()) {
      const bool is_output = key == "y" || key.rfind("topk_", 0) == 0 || key.rfind("grad.", 0) == 0 ||
                             key == "loss_nmse_ref" || key == "dloss_dy";
      if (!is_output) continue;
      if (!out.contains(key)) {
        std::fprintf(stderr, "%s: missing %s\n", argv[1], key.c_str());
        ++failures;
        continue;
      }
      ++compared;
      if (key == "topk_indices") {
        const auto a = out.read_all<std::int64_t>(key, ref.info(key).shape);
        const auto b = ref.read_all<std::int64_t>(key);
        const auto v = ref.read_all<double>("topk_values");
        for (std::size_t i = 0; i < b.size(); ++i)
          if (v[i] > 0 && a[i] != b[i]) {
            std::fprintf(stderr, "%s: topk_indices[%zu] = %lld, expected %lld\n", argv[1], i,
                         (long long)a[i], (long long)b[i]);
            ++failures;
          }
        continue;
      }
      const auto a = out.read_all<double>(key, ref.info(key).shape);
      const auto b = ref.read_all<double>(key);
      const double e = mxd_test::rel_error(a.data(), b.data(), b.size());
      if (!(e <= tol)) {
        std::fprintf(stderr, "%s: %s relative error %.3e > %.1e\n", argv[1], key.c_str(), e, tol);
        ++failures;
      }
    }
    std::printf("%s: %d tensors compared, %d failures\n", argv[1], compared, failures);
    return failures == 0 && compared > 0 ? 0 : 1;
  } catch (const mxd::Error& e) {
    std::fprintf(stderr, "mxd_compare: %s\n", e.what());
    return 1;
  }
}
