// SPDX-License-Identifier: MIT
// Argument parsing shared by the mxd subcommands: positionals, `--flag value`, `--flag=value`.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <mxd/error.hpp>

namespace mxd::cli {

// Every error is exactly one line: whatever a message echoes (the library escapes what it
// takes from files; paths come from the command line) cannot start a second one.
inline std::string one_line(const char* what) {
  std::string out;
  for (const char* p = what; *p && out.size() < 4000; ++p) {
    const unsigned char ch = static_cast<unsigned char>(*p);
    if (ch >= 0x20 && ch != 0x7f) {
      out += *p;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", ch);
      out += buf;
    }
  }
  return out;
}

class Args {
public:
  /// Parses argv[first..argc); every --flag must be in `flags` (value flags) or `switches`.
  Args(int argc, char** argv, int first, const std::set<std::string>& flags,
       const std::set<std::string>& switches = {}) {
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        help_ = true;
        continue;
      }
      if (a.rfind("--", 0) != 0) {
        positional_.push_back(a);
        continue;
      }
      std::string key = a.substr(2), value;
      const auto eq = key.find('=');
      const bool inline_value = eq != std::string::npos;
      if (inline_value) {
        value = key.substr(eq + 1);
        key = key.substr(0, eq);
      }
      if (switches.count(key)) {
        MXD_CHECK(!inline_value || value == "1" || value == "0", "--", key, " takes no value");
        values_[key].push_back(inline_value ? value : "1");
        continue;
      }
      MXD_CHECK(flags.count(key), "unknown option --", key, " (see --help)");
      if (!inline_value) {
        MXD_CHECK(i + 1 < argc, "option --", key, " needs a value");
        value = argv[++i];
      }
      values_[key].push_back(value);
    }
  }

  bool help() const { return help_; }
  const std::vector<std::string>& positional() const { return positional_; }
  bool has(const std::string& key) const { return values_.count(key) != 0; }
  /// Every value given for a repeatable option, in order.
  std::vector<std::string> all(const std::string& key) const {
    auto it = values_.find(key);
    return it == values_.end() ? std::vector<std::string>{} : it->second;
  }
  std::string get(const std::string& key, const std::string& fallback) const {
    auto it = values_.find(key);
    return it == values_.end() ? fallback : it->second.back();
  }
  bool flag(const std::string& key) const { return get(key, "0") == "1"; }

  /// --key as an integer in [lo, hi]. The range is checked on the text's own value, before
  /// any caller narrows it, and a value beyond 64 bits is out of range rather than wrapped.
  long long get_int(const std::string& key, long long fallback, long long lo = LLONG_MIN,
                    long long hi = LLONG_MAX) const {
    if (!has(key)) return fallback;
    const std::string v = get(key, "");
    const std::size_t sign = !v.empty() && (v[0] == '+' || v[0] == '-') ? 1 : 0;
    MXD_CHECK(v.size() > sign && v.find_first_not_of("0123456789", sign) == std::string::npos,
              "--", key, " = '", v, "' is not an integer");
    long long out = 0;
    bool in_range = true;
    try {
      out = std::stoll(v);
    } catch (const std::out_of_range&) {
      in_range = false;
    }
    MXD_CHECK(in_range && out >= lo && out <= hi, "--", key, " = ", v, " is out of range [", lo,
              ", ", hi, "]");
    return out;
  }

  double get_double(const std::string& key, double fallback) const {
    if (!has(key)) return fallback;
    const std::string v = get(key, "");
    std::size_t used = 0;
    double out = 0;
    try {
      out = std::stod(v, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MXD_CHECK(used == v.size() && !v.empty() && std::isfinite(out), "--", key, " = '", v,
              "' is not a finite number");
    return out;
  }

private:
  bool help_ = false;
  std::vector<std::string> positional_;
  std::map<std::string, std::vector<std::string>> values_;
};

}  // namespace mxd::cli

#include <mxd/config.hpp>

namespace mxd::cli {

/// The largest width a flag may give (d_in, d_hidden, d_out, hidden units): with experts and
/// latents below 2^31, every parameter count and shape product stays within 64 bits, so sizes
/// that cannot be held are refused by the memory check instead of wrapping. Far above any
/// real layer's.
inline constexpr long long max_width = 1LL << 20;

/// The layer flags shared by `mxd train` and `mxd bench`.
inline const std::set<std::string>& layer_flags() {
  static const std::set<std::string> f = {"d-in", "d-hidden", "d-out", "experts", "k", "activation"};
  return f;
}
inline const std::set<std::string>& layer_switches() {
  static const std::set<std::string> s = {"glu", "skip"};
  return s;
}

/// Their --help lines; without `with_k` for commands that document their own --k.
inline std::string layer_flags_help(bool with_k = true) {
  return std::string("  --d-in I          input width\n"
                     "  --d-hidden H      hidden width of the encoder\n"
                     "  --d-out O         output width\n"
                     "  --experts N       number of experts\n") +
         (with_k ? "  --k K             experts selected per row\n" : "") +
         "  --activation A    relu | gelu | gelu_tanh | sigmoid | silu\n"
         "  --glu, --skip     GLU encoder; linear skip connection (needs I == O)\n";
}

/// Applies the layer flags present in `args` on top of `defaults` and validates the result
/// (--k too unless `read_k` is false, for commands that take a list of k).
inline Config layer_config(const Args& args, Config c, bool read_k = true) {
  c.d_in = args.get_int("d-in", c.d_in, 1, max_width);
  c.d_hidden = args.get_int("d-hidden", c.d_hidden, 1, max_width);
  c.d_out = args.get_int("d-out", c.d_out, 1, max_width);
  c.n_experts = args.get_int("experts", c.n_experts, 1, INT32_MAX);
  if (read_k) c.k = args.get_int("k", c.k, 1, INT32_MAX);
  if (args.has("activation")) c.activation = parse_activation(args.get("activation", ""));
  if (args.has("glu")) c.glu = args.flag("glu");
  if (args.has("skip")) c.skip = args.flag("skip");
  c.validate();
  return c;
}

/// --threads N as an int: the range is checked on the parsed 64-bit value, before any cast.
inline int threads_arg(const Args& args) {
  const long long n = args.get_int("threads", 0);
  MXD_CHECK(n >= 0 && n <= 1024, "--threads = ", n, " is out of range [0, 1024] (0 = all cores)");
  return static_cast<int>(n);
}

/// Median of timings (mean of the middle two for an even count); v must not be empty.
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace mxd::cli
