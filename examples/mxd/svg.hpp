// SPDX-License-Identifier: MIT
// A minimal SVG line plot for the mxd tool (loss curves, sparsity-accuracy frontiers): no
// plotting dependency, and any browser opens the result.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <mxd/error.hpp>

namespace mxd::cli {

/// Writes `text` to `path` through a temporary file and a rename.
inline void write_text_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    MXD_CHECK(f.good(), "cannot write '", tmp, "'");
    f << text;
    MXD_CHECK(f.good(), "writing '", tmp, "' failed");
  }
  MXD_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename '", tmp, "' to '", path, "'");
}

struct Series {
  std::string name;
  std::vector<double> x, y;
};

/// Writes `series` as an SVG line chart to `path` (atomically); `log_y` plots log10(y).
inline void write_svg_plot(const std::string& path, const std::string& title,
                           const std::string& x_label, const std::string& y_label,
                           const std::vector<Series>& series, bool log_y) {
  const double W = 720, H = 440, L = 80, R = 170, T = 40, Bm = 50;
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  auto ty = [&](double v) { return log_y ? std::log10(std::max(v, 1e-30)) : v; };
  for (const Series& s : series)
    for (std::size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      x0 = std::min(x0, s.x[i]); x1 = std::max(x1, s.x[i]);
      y0 = std::min(y0, ty(s.y[i])); y1 = std::max(y1, ty(s.y[i]));
    }
  if (x0 > x1) { x0 = 0; x1 = 1; y0 = 0; y1 = 1; }
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) y1 = y0 + 1;
  auto px = [&](double v) { return L + (v - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double v) { return H - Bm - (ty(v) - y0) / (y1 - y0) * (H - T - Bm); };
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                          "#e377c2", "#7f7f7f"};
  std::string out;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" "
                "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
                W, H);
  out += buf;
  std::snprintf(buf, sizeof buf, "<text x=\"%g\" y=\"24\" font-size=\"15\">%s</text>\n", L, title.c_str());
  out += buf;
  std::snprintf(buf, sizeof buf,
                "<rect x=\"%g\" y=\"%g\" width=\"%g\" height=\"%g\" fill=\"none\" stroke=\"#444\"/>\n",
                L, T, W - L - R, H - T - Bm);
  out += buf;
  for (int i = 0; i <= 4; ++i) {  // axis ticks
    const double fx = x0 + (x1 - x0) * i / 4, fy = y0 + (y1 - y0) * i / 4;
    const double yv = log_y ? std::pow(10.0, fy) : fy;
    std::snprintf(buf, sizeof buf,
                  "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">%.4g</text>\n"
                  "<text x=\"%g\" y=\"%g\" text-anchor=\"end\">%.3g</text>\n",
                  px(fx), H - Bm + 16, fx, L - 6, H - Bm - (fy - y0) / (y1 - y0) * (H - T - Bm) + 4, yv);
    out += buf;
  }
  std::snprintf(buf, sizeof buf,
                "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">%s</text>\n"
                "<text x=\"16\" y=\"%g\" transform=\"rotate(-90 16 %g)\" text-anchor=\"middle\">%s%s</text>\n",
                L + (W - L - R) / 2, H - 12, x_label.c_str(), T + (H - T - Bm) / 2,
                T + (H - T - Bm) / 2, y_label.c_str(), log_y ? " (log scale)" : "");
  out += buf;
  for (std::size_t s = 0; s < series.size(); ++s) {
    const char* c = colors[s % 8];
    out += "<polyline fill=\"none\" stroke-width=\"1.8\" stroke=\"";
    out += c;
    out += "\" points=\"";
    for (std::size_t i = 0; i < series[s].x.size(); ++i) {
      if (!std::isfinite(series[s].y[i])) continue;
      std::snprintf(buf, sizeof buf, "%.2f,%.2f ", px(series[s].x[i]), py(series[s].y[i]));
      out += buf;
    }
    out += "\"/>\n";
    std::snprintf(buf, sizeof buf,
                  "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"%s\" stroke-width=\"3\"/>"
                  "<text x=\"%g\" y=\"%g\">%s</text>\n",
                  W - R + 12, T + 14 + 18.0 * s, W - R + 32, T + 14 + 18.0 * s, c, W - R + 38,
                  T + 18 + 18.0 * s, series[s].name.c_str());
    out += buf;
  }
  out += "</svg>\n";
  write_text_atomic(path, out);
}

}  // namespace mxd::cli
