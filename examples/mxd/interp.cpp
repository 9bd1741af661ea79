// SPDX-License-Identifier: MIT
// mxd inspect / steer / probe: look inside a trained MxD checkpoint.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <mxd/interp/probe.hpp>
#include <mxd/interp/usage.hpp>
#include <mxd/io/params_io.hpp>
#include <mxd/mxd.hpp>

#include "cli.hpp"
#include "commands.hpp"
#include "svg.hpp"

namespace mxd::cli {
namespace {

const char* const inspect_help =
    "usage: mxd inspect CKPT [--data FILE] [--rows N] [--top N] [--json] [--plot FILE.svg]\n\n"
    "Prints the checkpoint's config and parameter count. With --data (a safetensors file with\n"
    "x [T, d_in]), runs the layer over the first --rows rows (default: all) and reports expert\n"
    "usage: firing frequencies as an ASCII histogram of log10 frequency, the dead-expert\n"
    "fraction, the entropy of usage and the --top most used experts (default 10).\n"
    "--json prints one JSON object instead; --plot writes the histogram as an SVG chart.\n";

const char* const steer_help =
    "usage: mxd steer CKPT --data FILE --expert N --add VALUE --out OUT.safetensors [--rows N]\n\n"
    "Runs the layer on x [T, d_in] from FILE with and without adding VALUE to expert N's\n"
    "coefficient in every row (the authors add 100), writes y, y_steered and their difference\n"
    "to OUT, and prints the Frobenius norm of the difference.\n";

const char* const probe_help =
    "usage: mxd probe --features FILE --labels FILE [--top N] [--json]\n\n"
    "Sparse probing as in the paper. FILE for --features holds `features` [S, F] (e.g. mean-\n"
    "pooled expert coefficients per example), the one for --labels holds `labels` [S] (integer\n"
    "class ids). For each class (one vs rest), features are ranked by the difference of class\n"
    "means, a 1-D logistic regression is fitted on each of the --top (default 8) best on the\n"
    "first 80% of examples, and the best held-out F1 and balanced accuracy are reported.\n";

struct Loaded {
  Config cfg;
  Params<float> p;
};

Loaded load(const std::string& path) {
  io::SafetensorsReader f(path);
  const Config cfg = io::read_config(f);
  return {cfg, io::load_params<float>(f, cfg)};
}

// Rows [0, rows) of x from `path`, in chunks of `chunk`, handed to fn(first_row, x).
template <class F>
index_t for_each_chunk(const std::string& path, index_t d_in, index_t rows, F&& fn) {
  MXD_CHECK(rows >= 0, "--rows = ", rows, " must be >= 0 (0 = all)");
  io::SafetensorsReader f(path);
  const auto& shape = f.info("x").shape;
  MXD_CHECK(shape.size() == 2 && shape[1] == d_in, path, ": x has shape ",
            io::detail::shape_str(shape), ", expected [T, ", d_in, "]");
  const index_t T = rows > 0 ? std::min<index_t>(rows, shape[0]) : shape[0];
  const index_t chunk = 1024;
  Tensor<float> x;
  for (index_t first = 0; first < T; first += chunk) {
    const index_t n = std::min(chunk, T - first);
    x.resize(n, d_in, false);
    f.read("x", x.data(), first * d_in, n * d_in);
    for (index_t r = 0; r < n; ++r) {  // the NaN/Inf policy, named by the file's own row
      const index_t c = first_non_finite(x.data() + r * d_in, d_in);
      MXD_CHECK(c < 0, path, ": x: non-finite value at row ", first + r, " (column ", c, ")");
    }
    fn(first, x);
  }
  return T;
}

}  // namespace

int run_inspect(int argc, char** argv) {
  Args args(argc, argv, 2, {"data", "rows", "top", "plot"}, {"json"});
  if (args.help()) {
    std::fputs(inspect_help, stdout);
    return 0;
  }
  MXD_CHECK(args.positional().size() == 1, "mxd inspect takes one checkpoint, got ",
            args.positional().size(), " paths");
  const Loaded m = load(args.positional()[0]);
  const Config& c = m.cfg;
  nlohmann::json j = {{"checkpoint", args.positional()[0]},
                      {"d_in", c.d_in}, {"d_hidden", c.d_hidden}, {"d_out", c.d_out},
                      {"n_experts", c.n_experts}, {"k", c.k},
                      {"activation", activation_name(c.activation)}, {"glu", c.glu},
                      {"skip", c.skip}, {"params", c.n_params()}};
  const bool json = args.flag("json");
  if (!json)
    std::printf("MxD %lld -> %lld -> %lld, %lld experts, k = %lld, %s%s%s, %lld parameters\n",
                (long long)c.d_in, (long long)c.d_hidden, (long long)c.d_out,
                (long long)c.n_experts, (long long)c.k, activation_name(c.activation),
                c.glu ? ", GLU" : "", c.skip ? ", skip" : "", (long long)c.n_params());
  if (args.has("data")) {
    interp::Usage usage(c.n_experts);
    Workspace<float> ws;
    Tensor<float> y;
    const index_t rows = for_each_chunk(args.get("data", ""), c.d_in, args.get_int("rows", 0),
                                        [&](index_t, const Tensor<float>& x) {
                                          y.resize(x.rows(), c.d_out, false);
                                          forward(m.p, x.view(), y.view(), ws);
                                          usage.add(ws.topk_idx, ws.topk_val);
                                        });
    const int bins = 12;
    const double lo = -std::max(1.0, std::ceil(std::log10(double(rows)))), hi = 0;
    const auto hist = usage.log10_histogram(bins, lo, hi);
    const long long n_top = args.get_int("top", 10);
    MXD_CHECK(n_top >= 0, "--top = ", n_top, " must be >= 0");
    const auto top = usage.most_used(n_top);
    j["rows"] = rows;
    j["dead_fraction"] = usage.dead_fraction();
    j["entropy"] = usage.entropy();
    j["histogram"] = {{"log10_lo", lo}, {"log10_hi", hi}, {"counts", hist}};
    j["top_experts"] = nlohmann::json::array();
    for (index_t n : top)
      j["top_experts"].push_back({{"expert", n}, {"frequency", usage.frequency(n)},
                                  {"mean_coefficient", usage.mean_coefficient(n)}});
    if (!json) {
      std::printf("\n%lld rows: %.2f%% of experts dead, usage entropy %.3f nats (uniform: %.3f)\n",
                  (long long)rows, 100 * usage.dead_fraction(), usage.entropy(),
                  std::log(double(c.n_experts)));
      std::printf("\nlog10 firing frequency of live experts\n");
      const index_t peak = std::max<index_t>(1, *std::max_element(hist.begin(), hist.end()));
      for (int b = 0; b < bins; ++b)
        std::printf("  [%5.2f, %5.2f) %6lld %s\n", lo + (hi - lo) * b / bins,
                    lo + (hi - lo) * (b + 1) / bins, (long long)hist[b],
                    std::string(static_cast<std::size_t>(50 * hist[b] / peak), '#').c_str());
      std::printf("\n%8s %10s %10s\n", "expert", "frequency", "mean coef");
      for (index_t n : top)
        std::printf("%8lld %10.4f %10.4f\n", (long long)n, usage.frequency(n), usage.mean_coefficient(n));
    }
    if (args.has("plot")) {
      Series s;
      s.name = "experts per bin";
      for (int b = 0; b < bins; ++b) {
        s.x.push_back(lo + (hi - lo) * (b + 0.5) / bins);
        s.y.push_back(double(hist[b]));
      }
      Axes axes;
      axes.title = "expert firing frequencies (live experts)";
      axes.x_label = "log10 frequency";
      axes.y_label = "experts";
      axes.bar_width = (hi - lo) / bins;
      write_svg_plot(args.get("plot", ""), axes, {s});
    }
  }
  if (json) std::printf("%s\n", j.dump().c_str());
  return 0;
}

int run_steer(int argc, char** argv) {
  Args args(argc, argv, 2, {"data", "expert", "add", "out", "rows"});
  if (args.help()) {
    std::fputs(steer_help, stdout);
    return 0;
  }
  MXD_CHECK(args.positional().size() == 1, "mxd steer takes one checkpoint");
  MXD_CHECK(args.has("data") && args.has("expert") && args.has("add") && args.has("out"),
            "mxd steer needs --data, --expert, --add and --out (see --help)");
  const Loaded m = load(args.positional()[0]);
  Steering s;
  s.add(args.get_int("expert", 0), args.get_double("add", 0));
  s.validate(m.cfg.n_experts);
  const index_t O = m.cfg.d_out;
  std::vector<float> y_all, ys_all;
  Workspace<float> ws;
  Tensor<float> y, ys;
  const index_t rows = for_each_chunk(args.get("data", ""), m.cfg.d_in, args.get_int("rows", 0),
                                      [&](index_t, const Tensor<float>& x) {
                                        y.resize(x.rows(), O, false);
                                        ys.resize(x.rows(), O, false);
                                        infer(m.p, x.view(), y.view(), ws);
                                        y_all.insert(y_all.end(), y.data(), y.data() + y.size());
                                        infer(m.p, x.view(), ys.view(), ws, &s);
                                        ys_all.insert(ys_all.end(), ys.data(), ys.data() + ys.size());
                                      });
  std::vector<float> diff(y_all.size());
  double norm = 0;
  for (std::size_t i = 0; i < diff.size(); ++i) {
    diff[i] = ys_all[i] - y_all[i];
    norm += double(diff[i]) * diff[i];
  }
  io::SafetensorsWriter w;
  w.set_metadata("expert", std::to_string(s.edits[0].expert));
  w.set_metadata("add", args.get("add", ""));
  w.add("y", {rows, O}, y_all.data());
  w.add("y_steered", {rows, O}, ys_all.data());
  w.add("difference", {rows, O}, diff.data());
  w.write(args.get("out", ""));
  std::printf("steered expert %lld by %+g over %lld rows: |y_steered - y|_F = %.6g -> %s\n",
              (long long)s.edits[0].expert, s.edits[0].value, (long long)rows, std::sqrt(norm),
              args.get("out", "").c_str());
  return 0;
}

int run_probe(int argc, char** argv) {
  Args args(argc, argv, 2, {"features", "labels", "top"}, {"json"});
  if (args.help()) {
    std::fputs(probe_help, stdout);
    return 0;
  }
  MXD_CHECK(args.has("features") && args.has("labels"), "mxd probe needs --features and --labels");
  io::SafetensorsReader ff(args.get("features", "")), lf(args.get("labels", ""));
  const Tensor<double> feats = io::read_matrix<double>(ff, "features");
  const std::vector<std::int64_t> labels = lf.read_all<std::int64_t>("labels", {feats.rows()});
  const auto rows = interp::sparse_probe(feats, labels, args.get_int("top", 8));
  nlohmann::json j = nlohmann::json::array();
  if (!args.flag("json")) std::printf("%8s %8s %8s %10s\n", "class", "feature", "F1", "bal. acc.");
  for (const auto& r : rows) {
    j.push_back({{"label", r.label}, {"feature", r.feature}, {"f1", r.f1},
                 {"balanced_accuracy", r.balanced_accuracy}});
    if (!args.flag("json"))
      std::printf("%8lld %8lld %8.3f %10.3f\n", (long long)r.label, (long long)r.feature, r.f1,
                  r.balanced_accuracy);
  }
  if (args.flag("json")) std::printf("%s\n", j.dump().c_str());
  return 0;
}

}  // namespace mxd::cli
