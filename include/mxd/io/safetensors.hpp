// SPDX-License-Identifier: MIT
/**
 * @file io/safetensors.hpp
 * @brief A validating safetensors reader and an atomic writer.
 *
 * The reader trusts nothing: the header length is checked against the file size before it is
 * read, the JSON is parsed with duplicate keys rejected, every dtype, shape and byte range is
 * checked (with overflow checks) and the ranges must tile the data buffer exactly, as the
 * reference Rust implementation requires. Tensor data is read on demand, by element range,
 * so large files are never loaded whole.
 *
 *     mxd::io::SafetensorsReader f("layer.safetensors");
 *     std::vector<float> w = f.read_all<float>("W_enc", {768, 3072});   // converts F16/BF16/F64
 *     mxd::io::SafetensorsWriter out;
 *     out.set_metadata("k", "32");
 *     out.add("W_enc", {768, 3072}, w.data(), mxd::io::DType::BF16);
 *     out.write("copy.safetensors");                                      // tmp file, then rename
 */
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../error.hpp"
#include "durable.hpp"

namespace mxd::io {

static_assert(sizeof(float) == 4 && sizeof(double) == 8, "IEEE float and double expected");

enum class DType { BOOL, U8, I8, I16, U16, I32, U32, I64, U64, F16, BF16, F32, F64 };

inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::BOOL: case DType::U8: case DType::I8: return 1;
    case DType::I16: case DType::U16: case DType::F16: case DType::BF16: return 2;
    case DType::I32: case DType::U32: case DType::F32: return 4;
    case DType::I64: case DType::U64: case DType::F64: return 8;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::BOOL: return "BOOL";
    case DType::U8: return "U8";
    case DType::I8: return "I8";
    case DType::I16: return "I16";
    case DType::U16: return "U16";
    case DType::I32: return "I32";
    case DType::U32: return "U32";
    case DType::I64: return "I64";
    case DType::U64: return "U64";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F32: return "F32";
    case DType::F64: return "F64";
  }
  return "?";
}

inline DType parse_dtype(const std::string& name) {
  for (DType t : {DType::BOOL, DType::U8, DType::I8, DType::I16, DType::U16, DType::I32,
                  DType::U32, DType::I64, DType::U64, DType::F16, DType::BF16, DType::F32,
                  DType::F64})
    if (name == dtype_name(t)) return t;
  throw Error("safetensors: unknown dtype '" + mxd::detail::printable(name) + "'");
}

template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::F32;
  else if constexpr (std::is_same_v<T, double>) return DType::F64;
  else if constexpr (std::is_same_v<T, std::int64_t>) return DType::I64;
  else if constexpr (std::is_same_v<T, std::int32_t>) return DType::I32;
  else static_assert(sizeof(T) == 0, "dtype_of: float, double, int64_t or int32_t");
}

/// One tensor's entry in the header.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  // absolute byte offsets in the file

  /// Product of the dimensions; an mxd::Error when a dimension is negative or it overflows.
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) {
      MXD_CHECK(d >= 0 && (d == 0 || n <= std::numeric_limits<std::int64_t>::max() / d),
                "tensor '", mxd::detail::printable(name), "': shape has ", shape.size(),
                " dimensions whose product is negative or overflows");
      n *= d;
    }
    return n;
  }
};

namespace detail {

inline bool little_endian() {
  const std::uint16_t one = 1;
  unsigned char b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

// IEEE half and bfloat16 <-> float, round to nearest even; NaN, Inf and subnormals kept.
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: value = mant * 2^-24
    float f = static_cast<float>(mant) * 5.9604644775390625e-08f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline std::uint16_t float_to_half(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u)  // Inf or NaN (keep NaN quiet and non-zero)
    return sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u);
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to Inf
  if (ax < 0x38800000u) {                          // below 2^-14: subnormal half or zero
    if (ax < 0x33000000u) return sign;             // below 2^-25: rounds to zero
    const std::uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    const int shift = static_cast<int>(126 - e);   // 14..24 for the subnormal range
    std::uint32_t h = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | static_cast<std::uint16_t>(h);
  }
  std::uint32_t h = ((ax >> 13) - (112u << 10));
  const std::uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | static_cast<std::uint16_t>(h);
}

inline float bf16_to_float(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

inline bool is_float(DType t) {
  return t == DType::F16 || t == DType::BF16 || t == DType::F32 || t == DType::F64;
}

// Converts n elements stored as `src` (raw little-endian bytes) into T.
template <class T>
void convert_from(DType src, const unsigned char* in, T* out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const unsigned char* p = in + i * dtype_size(src);
    switch (src) {
      case DType::F64: { double v; std::memcpy(&v, p, 8); out[i] = static_cast<T>(v); break; }
      case DType::F32: { float v; std::memcpy(&v, p, 4); out[i] = static_cast<T>(v); break; }
      case DType::F16: { std::uint16_t v; std::memcpy(&v, p, 2); out[i] = static_cast<T>(half_to_float(v)); break; }
      case DType::BF16: { std::uint16_t v; std::memcpy(&v, p, 2); out[i] = static_cast<T>(bf16_to_float(v)); break; }
      case DType::I64: { std::int64_t v; std::memcpy(&v, p, 8); out[i] = static_cast<T>(v); break; }
      case DType::I32: { std::int32_t v; std::memcpy(&v, p, 4); out[i] = static_cast<T>(v); break; }
      default: throw Error(std::string("safetensors: cannot convert from dtype ") + dtype_name(src));
    }
  }
}

template <class T>
void convert_to(DType dst, const T* in, unsigned char* out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    unsigned char* p = out + i * dtype_size(dst);
    switch (dst) {
      case DType::F64: { const double v = static_cast<double>(in[i]); std::memcpy(p, &v, 8); break; }
      case DType::F32: { const float v = static_cast<float>(in[i]); std::memcpy(p, &v, 4); break; }
      case DType::F16: { const std::uint16_t v = float_to_half(static_cast<float>(in[i])); std::memcpy(p, &v, 2); break; }
      case DType::BF16: { const std::uint16_t v = float_to_bf16(static_cast<float>(in[i])); std::memcpy(p, &v, 2); break; }
      case DType::I64: { const std::int64_t v = static_cast<std::int64_t>(in[i]); std::memcpy(p, &v, 8); break; }
      case DType::I32: { const std::int32_t v = static_cast<std::int32_t>(in[i]); std::memcpy(p, &v, 4); break; }
      default: throw Error(std::string("safetensors: cannot store dtype ") + dtype_name(dst));
    }
  }
}

inline std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace detail

/// Opens a safetensors file, validates its header, and reads tensors on demand.
class SafetensorsReader {
public:
  static constexpr std::uint64_t max_header_bytes = 100'000'000;

  explicit SafetensorsReader(std::string path) : path_(std::move(path)) {
    MXD_CHECK(detail::little_endian(), "safetensors: a little-endian host is required");
    regular_file_exists(path_);  // a missing file is reported by open() below
    errno = 0;
    file_.open(path_, std::ios::binary);
    MXD_CHECK(file_.good(), "safetensors: cannot open '", path_, "': ",
              errno ? std::strerror(errno) : "unknown reason");
    std::error_code ec;
    const auto size = std::filesystem::file_size(path_, ec);
    MXD_CHECK(!ec, "safetensors: cannot stat '", path_, "': ", ec.message());
    file_size_ = size;
    MXD_CHECK(file_size_ >= 8, path_, ": file of ", file_size_, " bytes is too small for a header");
    unsigned char len_bytes[8];
    read_bytes(0, len_bytes, 8);
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
    MXD_CHECK(n <= max_header_bytes, path_, ": header length ", n, " exceeds the limit of ",
              max_header_bytes, " bytes");
    MXD_CHECK(n <= file_size_ - 8, path_, ": header length ", n, " runs past the end of the ",
              file_size_, "-byte file");
    MXD_CHECK(n >= 2, path_, ": header length ", n, " is too small for a JSON object");
    std::string header(static_cast<std::size_t>(n), '\0');
    read_bytes(8, reinterpret_cast<unsigned char*>(header.data()), n);
    data_start_ = 8 + n;
    parse_header(header);
  }

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const {
    auto it = tensors_.find(name);
    MXD_CHECK(it != tensors_.end(), "tensor '", mxd::detail::printable(name), "' not found in ",
              path_);
    return it->second;
  }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }

  /// Elements [first, first + count) of the flattened tensor, converted to T. Reads only that
  /// byte range. Float <-> integer conversions are refused.
  template <class T>
  void read(const std::string& name, T* out, std::int64_t first, std::int64_t count) {
    const TensorInfo& t = info(name);
    const bool want_float = std::is_floating_point_v<T>;
    MXD_CHECK(want_float == detail::is_float(t.dtype), "tensor '", name, "' in ", path_,
              " has dtype ", dtype_name(t.dtype), ", which cannot be read as ",
              want_float ? "floating point" : "integer");
    MXD_CHECK(first >= 0 && count >= 0 && first <= t.numel() && count <= t.numel() - first,
              "read of elements [", first, ", ", first + count, ") is outside tensor '", name,
              "' of ", t.numel(), " elements");
    const std::size_t es = dtype_size(t.dtype);
    constexpr std::size_t chunk = 1 << 16;  // elements per read: bounded scratch memory
    std::vector<unsigned char> buf(std::min<std::size_t>(chunk, static_cast<std::size_t>(count)) * es);
    for (std::int64_t done = 0; done < count;) {
      const std::size_t n = std::min<std::size_t>(chunk, static_cast<std::size_t>(count - done));
      read_bytes(t.begin + static_cast<std::uint64_t>(first + done) * es, buf.data(), n * es);
      detail::convert_from(t.dtype, buf.data(), out + done, n);
      done += static_cast<std::int64_t>(n);
    }
  }

  /// The whole tensor; when `expected_shape` is given the tensor's shape must equal it.
  template <class T>
  std::vector<T> read_all(const std::string& name,
                          const std::vector<std::int64_t>& expected_shape = {}) {
    const TensorInfo& t = info(name);
    MXD_CHECK(expected_shape.empty() || t.shape == expected_shape, "tensor '", name, "' in ", path_,
              " has shape ", detail::shape_str(t.shape), ", expected ",
              detail::shape_str(expected_shape));
    std::vector<T> out(static_cast<std::size_t>(t.numel()));
    read(name, out.data(), 0, t.numel());
    return out;
  }

private:
  void read_bytes(std::uint64_t offset, unsigned char* out, std::uint64_t n) {
    file_.clear();
    file_.seekg(static_cast<std::streamoff>(offset));
    file_.read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(n));
    MXD_CHECK(file_.good() && static_cast<std::uint64_t>(file_.gcount()) == n, path_,
              ": could not read ", n, " bytes at offset ", offset, " (file truncated?)");
  }

  // A JSON value for an error message: scalars dumped (capped and escaped), containers by
  // type only, so a hostile value can neither flood the message nor recurse deeply.
  static std::string shown(const nlohmann::json& v) {
    if (v.is_structured()) return std::string("a JSON ") + v.type_name();
    return mxd::detail::printable(v.dump(-1, ' ', true), 40);
  }

  static std::uint64_t as_u64(const nlohmann::json& v, const std::string& what,
                              const std::string& path) {
    MXD_CHECK(v.is_number_unsigned() || (v.is_number_integer() && v.get<std::int64_t>() >= 0),
              path, ": ", what, " = ", shown(v), " is not a non-negative integer");
    return v.get<std::uint64_t>();
  }

  /// Deepest nesting a header may have: a valid one has 3 levels (header, entry, shape).
  static constexpr int max_json_depth = 8;

  void parse_header(const std::string& header) {
    MXD_CHECK(header[0] == '{', path_, ": header does not start with '{'");
    // nlohmann keeps the last of duplicate keys silently: track key sets per open object.
    std::vector<std::set<std::string>> open;
    bool duplicate = false;
    std::string dup_key;
    nlohmann::json::parser_callback_t cb = [&](int depth, nlohmann::json::parse_event_t ev,
                                               nlohmann::json& parsed) {
      using E = nlohmann::json::parse_event_t;
      // Refused while parsing, before a deep value exists: no recursion over it ever starts.
      if ((ev == E::object_start || ev == E::array_start) && depth >= max_json_depth)
        throw Error(mxd::detail::concat(path_, ": header nests deeper than ", max_json_depth,
                                        " levels"));
      if (ev == E::object_start) open.emplace_back();
      else if (ev == E::object_end && !open.empty()) open.pop_back();
      else if (ev == E::key && !open.empty() && !open.back().insert(parsed.get<std::string>()).second) {
        duplicate = true;
        dup_key = parsed.get<std::string>();
      }
      return true;
    };
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(header, cb);
    } catch (const nlohmann::json::exception& e) {
      throw Error(path_ + ": header is not valid JSON (" + mxd::detail::printable(e.what(), 200) + ")");
    }
    MXD_CHECK(!duplicate, path_, ": duplicate key '", mxd::detail::printable(dup_key), "' in header");
    MXD_CHECK(j.is_object(), path_, ": header is not a JSON object");

    const std::uint64_t buffer = file_size_ - data_start_;
    std::vector<const TensorInfo*> by_offset;
    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& key = it.key();
      const std::string shown_key = mxd::detail::printable(key);  // what messages echo
      const nlohmann::json& v = it.value();
      if (key == "__metadata__") {
        MXD_CHECK(v.is_object(), path_, ": __metadata__ is not an object");
        for (auto m = v.begin(); m != v.end(); ++m) {
          MXD_CHECK(m.value().is_string(), path_, ": __metadata__ value of '",
                    mxd::detail::printable(m.key()), "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      MXD_CHECK(v.is_object() && v.size() == 3 && v.contains("dtype") && v.contains("shape") &&
                    v.contains("data_offsets"),
                path_, ": entry '", shown_key, "' must hold exactly dtype, shape and data_offsets");
      MXD_CHECK(v["dtype"].is_string(), path_, ": dtype of '", shown_key, "' is not a string");
      TensorInfo t;
      t.name = key;
      try {
        t.dtype = parse_dtype(v["dtype"].get<std::string>());
      } catch (const Error& e) {
        throw Error(path_ + ": tensor '" + shown_key + "': " + e.what());
      }
      MXD_CHECK(v["shape"].is_array(), path_, ": shape of '", shown_key, "' is not an array");
      std::uint64_t numel = 1;
      bool overflow = false;
      for (const auto& d : v["shape"]) {
        const std::uint64_t dim = as_u64(d, "a dimension of '" + shown_key + "'", path_);
        MXD_CHECK(dim <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                  path_, ": dimension ", dim, " of '", shown_key, "' is too large");
        if (dim != 0 && numel > std::numeric_limits<std::uint64_t>::max() / dim) overflow = true;
        numel *= dim;
        t.shape.push_back(static_cast<std::int64_t>(dim));
      }
      const auto& off = v["data_offsets"];
      MXD_CHECK(off.is_array() && off.size() == 2, path_, ": data_offsets of '", shown_key,
                "' is not a pair");
      const std::uint64_t b = as_u64(off[0], "data_offsets[0] of '" + shown_key + "'", path_);
      const std::uint64_t e = as_u64(off[1], "data_offsets[1] of '" + shown_key + "'", path_);
      MXD_CHECK(b <= e && e <= buffer, path_, ": data_offsets [", b, ", ", e, "] of '", shown_key,
                "' lie outside the ", buffer, "-byte data buffer");
      const std::uint64_t es = dtype_size(t.dtype);
      MXD_CHECK(!overflow && numel <= std::numeric_limits<std::uint64_t>::max() / es &&
                    numel * es == e - b,
                path_, ": tensor '", shown_key, "' of shape ", detail::shape_str(t.shape), " and dtype ",
                dtype_name(t.dtype), " does not fill its ", e - b, "-byte range");
      t.begin = data_start_ + b;
      t.end = data_start_ + e;
      by_offset.push_back(&tensors_.emplace(key, std::move(t)).first->second);
    }
    // The ranges must tile the buffer: no overlap, no hole, nothing after the last tensor.
    std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    std::uint64_t cursor = data_start_;
    for (const TensorInfo* t : by_offset) {
      MXD_CHECK(t->begin == cursor, path_, ": tensor '", mxd::detail::printable(t->name),
                "' starts at byte ",
                t->begin - data_start_, " of the data buffer, expected ", cursor - data_start_,
                t->begin < cursor ? " (ranges overlap)" : " (hole between tensors)");
      cursor = t->end;
    }
    MXD_CHECK(cursor == file_size_, path_, ": ", file_size_ - cursor,
              " bytes after the last tensor are not covered by the header");
  }

  std::string path_;
  std::ifstream file_;
  std::uint64_t file_size_ = 0, data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors and metadata, then writes them the way the reference writer does:
/// largest alignment first then by name, header padded with spaces to a multiple of 8.
class SafetensorsWriter {
public:
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// Copies `data` (product of shape elements) converted from T to `stored_as`.
  template <class T>
  void add(const std::string& name, std::vector<std::int64_t> shape, const T* data, DType stored_as) {
    MXD_CHECK(!name.empty() && name != "__metadata__", "safetensors: invalid tensor name '", name, "'");
    MXD_CHECK(!tensors_.count(name), "safetensors: tensor '", name, "' added twice");
    MXD_CHECK(detail::is_float(stored_as) == std::is_floating_point_v<T> ||
                  !std::is_floating_point_v<T>,
              "safetensors: tensor '", name, "' of floating-point values cannot be stored as ",
              dtype_name(stored_as));
    std::int64_t numel = 1;
    for (auto d : shape) {
      MXD_CHECK(d >= 0, "safetensors: tensor '", name, "' has negative dimension ", d);
      numel *= d;
    }
    Entry e{stored_as, std::move(shape), {}};
    e.bytes.resize(static_cast<std::size_t>(numel) * dtype_size(stored_as));
    detail::convert_to(stored_as, data, e.bytes.data(), static_cast<std::size_t>(numel));
    tensors_.emplace(name, std::move(e));
  }
  template <class T>
  void add(const std::string& name, std::vector<std::int64_t> shape, const T* data) {
    add(name, std::move(shape), data, dtype_of<T>());
  }

  /// Writes `path` through a DurableFile: a failed write, a full disk, a kill or a crash
  /// leaves either the old file or the complete new one.
  void write(const std::string& path) const {
    std::vector<std::pair<std::string, const Entry*>> order;
    for (const auto& kv : tensors_) order.emplace_back(kv.first, &kv.second);
    std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
      return dtype_size(a.second->dtype) > dtype_size(b.second->dtype);
    });
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const auto& [name, e] : order) {
      header[name] = {{"dtype", dtype_name(e->dtype)},
                      {"shape", e->shape},
                      {"data_offsets", {offset, offset + e->bytes.size()}}};
      offset += e->bytes.size();
    }
    std::string h = header.dump();
    h.append((8 - h.size() % 8) % 8, ' ');
    DurableFile out(path);
    unsigned char len[8];
    std::uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
    out.write(len, 8);
    out.write(h);
    for (const auto& [name, e] : order) out.write(e->bytes.data(), e->bytes.size());
    out.commit();
  }

private:
  struct Entry {
    DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<unsigned char> bytes;
  };
  std::map<std::string, Entry> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace mxd::io
