// SPDX-License-Identifier: MIT
/// @file error.hpp
/// @brief mxd::Error, the one exception type of the library, and the MXD_CHECK macro.
///
/// Every bad input (a wrong shape, k > n_experts, a corrupt file) throws mxd::Error with a
/// message that names the offending value; library code never exits or prints.
#pragma once

#include <cstddef>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mxd {

/// The exception thrown for every invalid argument, shape, configuration or file.
class Error : public std::runtime_error {
public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

/// `s` made safe to echo in a message: control and non-ASCII bytes as \xNN (so a name holding
/// a newline cannot print a second, spoofed error line), cut to `max` bytes with its length noted.
inline std::string printable(const std::string& s, std::size_t max = 80) {
  std::string out;
  for (std::size_t i = 0; i < s.size() && i < max; ++i) {
    const unsigned char ch = static_cast<unsigned char>(s[i]);
    if (ch >= 0x20 && ch < 0x7f && ch != '\\') {
      out += static_cast<char>(ch);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", ch);
      out += buf;
    }
  }
  if (s.size() > max) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

}  // namespace detail
}  // namespace mxd

/// Throws mxd::Error with the streamed message when `cond` is false, e.g.
/// `MXD_CHECK(k <= n, "k = ", k, " exceeds n_experts = ", n);`
#define MXD_CHECK(cond, ...)                                          \
  do {                                                                \
    if (!(cond)) throw ::mxd::Error(::mxd::detail::concat(__VA_ARGS__)); \
  } while (0)
