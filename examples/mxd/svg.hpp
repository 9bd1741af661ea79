// SPDX-License-Identifier: MIT
// Minimal SVG plots for the mxd tool (loss curves, sparsity-accuracy frontiers, histograms):
// no plotting dependency, and any browser opens the result.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <mxd/error.hpp>
#include <mxd/io/durable.hpp>

namespace mxd::cli {

/// One line (or set of bars) of a plot.
struct Series {
  std::string name;
  std::vector<double> x, y;
  int color = -1;        // palette index; -1: the series' position in the plot
  bool dashed = false;   // dashed line, e.g. a baseline drawn in its partner's colour
  bool markers = false;  // a dot at every point
};

/// A plot's text and scales.
struct Axes {
  std::string title, x_label, y_label;
  bool log_x = false, log_y = false;
  std::vector<double> x_ticks;  // where to put x ticks (empty: round ticks)
  double bar_width = 0;         // > 0: every series as bars this wide centred on x, from y = 0
};

/// Round tick values in [lo, hi]: multiples of 1, 2 or 5 times a power of ten, about
/// `target` of them.
inline std::vector<double> round_ticks(double lo, double hi, int target = 5) {
  std::vector<double> ticks;
  if (!(hi > lo)) return {lo};
  const double raw = (hi - lo) / target, mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = 10 * mag;
  for (double m : {1.0, 2.0, 5.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  for (double i = std::ceil(lo / step - 1e-9); i * step <= hi + 1e-9 * step; ++i)
    ticks.push_back(i * step);
  return ticks;
}

/// Round tick values for a log axis spanning 10^lo .. 10^hi: powers of ten, with their 2 and 5
/// multiples over two decades or less, or round linear ticks where those are fewer than 3.
inline std::vector<double> round_log_ticks(double lo, double hi) {
  std::vector<double> ticks;
  const bool fine = hi - lo <= 2;
  const double e1 = std::floor(hi + 1e-9), every = fine ? 1 : std::ceil((hi - lo) / 6);
  for (double e = fine ? std::floor(lo) : std::ceil(lo - 1e-9); e <= e1; e += every)
    for (double m : {1.0, 2.0, 5.0}) {
      if (m > 1 && !fine) break;
      const double v = m * std::pow(10.0, e), l = std::log10(v);
      if (l >= lo - 1e-9 && l <= hi + 1e-9) ticks.push_back(v);
    }
  if (ticks.size() >= 3 || !fine) return ticks;
  ticks.clear();
  for (double v : round_ticks(std::pow(10.0, lo), std::pow(10.0, hi), 6))
    if (v > 0) ticks.push_back(v);
  return ticks;
}

/// A tick label without rounding noise (0.30000000000000004 -> 0.3).
inline std::string tick_label(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", std::abs(v) < 1e-300 ? 0.0 : v);
  return buf;
}

/// Writes `series` as an SVG chart to `path` (atomically).
inline void write_svg_plot(const std::string& path, const Axes& axes, const std::vector<Series>& series) {
  const double W = 720, H = 440, L = 80, R = 190, T = 40, Bm = 50;
  const bool bars = axes.bar_width > 0;
  auto tx = [&](double v) { return axes.log_x ? std::log10(std::max(v, 1e-300)) : v; };
  auto ty = [&](double v) { return axes.log_y ? std::log10(std::max(v, 1e-300)) : v; };
  double x0 = 1e300, x1 = -1e300, y0 = bars ? 0 : 1e300, y1 = -1e300;
  for (const Series& s : series)
    for (std::size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i]) || (axes.log_y && s.y[i] <= 0)) continue;
      x0 = std::min(x0, tx(s.x[i] - axes.bar_width / 2));
      x1 = std::max(x1, tx(s.x[i] + axes.bar_width / 2));
      y0 = std::min(y0, ty(s.y[i]));
      y1 = std::max(y1, ty(s.y[i]));
    }
  if (x0 > x1) x0 = 0, x1 = 1;
  if (y0 > y1) y0 = 0, y1 = 1;
  if (x1 == x0) x0 -= 0.5, x1 += 0.5;
  if (y1 == y0) y0 -= 0.5, y1 += 0.5;
  if (!bars) {  // a margin so that markers and line ends stay inside the frame
    const double mx = 0.03 * (x1 - x0);
    x0 -= mx, x1 += mx;
  }
  const double my = 0.04 * (y1 - y0);
  if (!bars) y0 -= my;
  y1 += my;
  // Plot coordinates of axis values (already through the log where the axis is one).
  auto px = [&](double v) { return L + (v - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double v) { return H - Bm - (v - y0) / (y1 - y0) * (H - T - Bm); };
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                          "#e377c2", "#7f7f7f"};
  std::string out;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" "
                "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
                W, H);
  out += buf;
  std::snprintf(buf, sizeof buf, "<text x=\"%g\" y=\"24\" font-size=\"15\">%s</text>\n", L,
                axes.title.c_str());
  out += buf;
  // Ticks with light grid lines, at round values (or the given x positions).
  const std::vector<double> xt = !axes.x_ticks.empty() ? axes.x_ticks
                                 : axes.log_x           ? round_log_ticks(x0, x1)
                                                        : round_ticks(x0, x1);
  for (double v : xt) {
    const double x = px(tx(v));
    if (x < L - 0.5 || x > W - R + 0.5) continue;
    std::snprintf(buf, sizeof buf,
                  "<line x1=\"%.2f\" y1=\"%g\" x2=\"%.2f\" y2=\"%g\" stroke=\"#e4e4e4\"/>"
                  "<text x=\"%.2f\" y=\"%g\" text-anchor=\"middle\">%s</text>\n",
                  x, T, x, H - Bm, x, H - Bm + 16, tick_label(v).c_str());
    out += buf;
  }
  for (double v : axes.log_y ? round_log_ticks(y0, y1) : round_ticks(y0, y1)) {
    const double y = py(ty(v));
    if (y < T - 0.5 || y > H - Bm + 0.5) continue;
    std::snprintf(buf, sizeof buf,
                  "<line x1=\"%g\" y1=\"%.2f\" x2=\"%g\" y2=\"%.2f\" stroke=\"#e4e4e4\"/>"
                  "<text x=\"%g\" y=\"%.2f\" text-anchor=\"end\">%s</text>\n",
                  L, y, W - R, y, L - 6, y + 4, tick_label(v).c_str());
    out += buf;
  }
  std::snprintf(buf, sizeof buf,
                "<rect x=\"%g\" y=\"%g\" width=\"%g\" height=\"%g\" fill=\"none\" stroke=\"#444\"/>\n",
                L, T, W - L - R, H - T - Bm);
  out += buf;
  std::snprintf(buf, sizeof buf,
                "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">%s%s</text>\n"
                "<text x=\"16\" y=\"%g\" transform=\"rotate(-90 16 %g)\" text-anchor=\"middle\">%s%s</text>\n",
                L + (W - L - R) / 2, H - 12, axes.x_label.c_str(), axes.log_x ? " (log scale)" : "",
                T + (H - T - Bm) / 2, T + (H - T - Bm) / 2, axes.y_label.c_str(),
                axes.log_y ? " (log scale)" : "");
  out += buf;
  for (std::size_t s = 0; s < series.size(); ++s) {
    const Series& se = series[s];
    const char* c = colors[(se.color >= 0 ? std::size_t(se.color) : s) % 8];
    const char* dash = se.dashed ? " stroke-dasharray=\"7 4\"" : "";
    if (bars) {
      for (std::size_t i = 0; i < se.x.size(); ++i) {
        if (!std::isfinite(se.y[i])) continue;
        const double xa = px(tx(se.x[i] - axes.bar_width / 2)), xb = px(tx(se.x[i] + axes.bar_width / 2));
        const double ya = py(ty(se.y[i])), yb = py(0);
        std::snprintf(buf, sizeof buf,
                      "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\" "
                      "fill-opacity=\"0.8\" stroke=\"white\"/>\n",
                      xa, std::min(ya, yb), xb - xa, std::abs(yb - ya), c);
        out += buf;
      }
    } else {
      out += std::string("<polyline fill=\"none\" stroke-width=\"1.8\" stroke=\"") + c + "\"" + dash +
             " points=\"";
      std::string dots;
      for (std::size_t i = 0; i < se.x.size(); ++i) {
        if (!std::isfinite(se.y[i]) || (axes.log_y && se.y[i] <= 0)) continue;
        const double x = px(tx(se.x[i])), y = py(ty(se.y[i]));
        std::snprintf(buf, sizeof buf, "%.2f,%.2f ", x, y);
        out += buf;
        if (se.markers) {
          std::snprintf(buf, sizeof buf, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"4\" fill=\"%s\"/>\n", x, y, c);
          dots += buf;
        }
      }
      out += "\"/>\n" + dots;
    }
    // Legend entry: a line sample in the series' colour and dash (a square for bars).
    const double ly = T + 14 + 18.0 * double(s);
    if (bars)
      std::snprintf(buf, sizeof buf, "<rect x=\"%g\" y=\"%g\" width=\"20\" height=\"10\" fill=\"%s\"/>", W - R + 12,
                    ly - 5, c);
    else
      std::snprintf(buf, sizeof buf,
                    "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"%s\" stroke-width=\"3\"%s/>",
                    W - R + 12, ly, W - R + 36, ly, c, dash);
    out += buf;
    std::snprintf(buf, sizeof buf, "<text x=\"%g\" y=\"%g\">%s</text>\n", W - R + 42, ly + 4,
                  se.name.c_str());
    out += buf;
  }
  out += "</svg>\n";
  io::write_file_durable(path, out);
}

}  // namespace mxd::cli
