// SPDX-License-Identifier: MIT
// The safetensors reader and writer: round trips of every dtype, the golden files, and one
// test per way a file can be corrupt, truncated or hostile.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "testing.hpp"

using namespace mxd::io;
using mxd_test::error_of;
namespace fs = std::filesystem;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void spit(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A file from a raw header and data buffer, the length prefix computed.
std::string raw_file(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

// The error of opening a file holding `header` + `data`.
std::string open_error(const std::string& header, const std::string& data = std::string(8, '\0')) {
  const fs::path p = mxd_test::scratch_path("hostile.safetensors");
  spit(p, raw_file(header, data));
  return error_of([&] { SafetensorsReader r(p.string()); });
}

bool has(const std::string& message, const std::string& part) {
  return message.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("every dtype round-trips: exact for F64 F32 I64 I32 and within rounding for F16 BF16") {
  const double values[5] = {1.0, -2.5, 0.1, 1000.0, -0.0078125};
  const std::int64_t ints[5] = {0, -1, 7, 1LL << 40, -(1LL << 40)};
  const std::int32_t ints32[5] = {0, -1, 7, 1 << 30, -(1 << 30)};
  SafetensorsWriter w;
  w.set_metadata("note", "round trip");
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16})
    w.add(std::string("v_") + dtype_name(t), {5}, values, t);
  w.add("i64", {5}, ints);
  w.add("i32", {1, 5}, ints32);
  w.add("empty", {0, 3}, values, DType::F32);
  w.add("scalar", {}, values, DType::F64);
  const fs::path p = mxd_test::scratch_path("roundtrip.safetensors");
  w.write(p.string());

  SafetensorsReader r(p.string());
  CHECK(r.metadata().at("note") == "round trip");
  CHECK(r.read_all<double>("v_F64") == std::vector<double>(values, values + 5));
  const auto f32 = r.read_all<double>("v_F32");
  for (int i = 0; i < 5; ++i) CHECK(f32[i] == double(float(values[i])));
  const auto f16 = r.read_all<double>("v_F16"), bf16 = r.read_all<double>("v_BF16");
  for (int i = 0; i < 5; ++i) {
    CHECK(std::abs(f16[i] - values[i]) <= std::abs(values[i]) * 0x1p-11);   // 11-bit significand
    CHECK(std::abs(bf16[i] - values[i]) <= std::abs(values[i]) * 0x1p-8);   // 8-bit significand
  }
  CHECK(r.read_all<std::int64_t>("i64") == std::vector<std::int64_t>(ints, ints + 5));
  CHECK(r.read_all<std::int32_t>("i32", {1, 5}) == std::vector<std::int32_t>(ints32, ints32 + 5));
  CHECK(r.read_all<float>("empty").empty());
  CHECK(r.info("scalar").shape.empty());
  CHECK(r.read_all<double>("scalar") == std::vector<double>{1.0});
  CHECK(r.names().size() == 8);
}

TEST_CASE("the writer aligns every tensor to its element size and pads the header with spaces") {
  const double d[3] = {1, 2, 3};
  SafetensorsWriter w;
  w.add("a_half", {3}, d, DType::F16);
  w.add("b_double", {1}, d, DType::F64);
  const fs::path p = mxd_test::scratch_path("aligned.safetensors");
  w.write(p.string());
  const std::string bytes = slurp(p);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  CHECK(n % 8 == 0);
  const std::string header = bytes.substr(8, n);
  CHECK(header[header.find_last_not_of(' ')] == '}');  // only spaces follow the JSON
  SafetensorsReader r(p.string());
  CHECK(r.info("b_double").begin % 8 == 0);  // the F64 tensor is written first
  CHECK(r.info("a_half").begin == r.info("b_double").end);
}

TEST_CASE("golden files read with their metadata and shapes") {
  SafetensorsReader r(mxd_test::data_path("relu_basic.safetensors"));
  CHECK(r.metadata().at("k") == "8");
  CHECK(r.info("W_enc").shape == std::vector<std::int64_t>{16, 64});
  CHECK(r.info("topk_indices").dtype == DType::I64);
  const auto w = r.read_all<float>("W_enc");
  CHECK(w.size() == 16 * 64);
  for (float v : w) CHECK(std::isfinite(v));
}

TEST_CASE("a partial read returns exactly the requested element range") {
  SafetensorsReader r(mxd_test::data_path("relu_basic.safetensors"));
  const auto all = r.read_all<double>("W_enc");
  std::vector<double> part(10);
  r.read("W_enc", part.data(), 100, 10);
  CHECK(std::equal(part.begin(), part.end(), all.begin() + 100));
  CHECK(has(error_of([&] { r.read("W_enc", part.data(), 1020, 10); }), "outside tensor 'W_enc'"));
}

TEST_CASE("F16 and BF16 conversions of known bit patterns") {
  using namespace mxd::io::detail;
  CHECK(float_to_half(1.0f) == 0x3c00);
  CHECK(float_to_half(-2.5f) == 0xc100);
  CHECK(float_to_half(65504.0f) == 0x7bff);
  CHECK(float_to_half(65520.0f) == 0x7c00);  // rounds up past the largest half: Inf
  CHECK(float_to_half(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(std::isnan(half_to_float(float_to_half(std::nanf("")))));
  CHECK(half_to_float(0x0001) == 0x1p-24f);  // smallest subnormal
  CHECK(float_to_half(0x1p-24f) == 0x0001);
  CHECK(float_to_half(0x1p-25f) == 0x0000);  // halfway to the smallest subnormal: ties to even
  CHECK(float_to_half(1.0f + 0x1p-11f) == 0x3c00);            // tie between 1 and 1+2^-10: even
  CHECK(float_to_half(1.0f + 3 * 0x1p-11f) == 0x3c02);        // tie: rounds to the even 1+2^-9
  CHECK(half_to_float(0xc100) == -2.5f);
  CHECK(float_to_bf16(1.0f) == 0x3f80);
  CHECK(float_to_bf16(1.0f + 0x1p-8f) == 0x3f80);             // tie: even
  CHECK(float_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82);
  CHECK(bf16_to_float(0xc020) == -2.5f);
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  CHECK(float_to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80);
}

TEST_CASE("every truncation of a valid file is rejected with an error") {
  const std::string bytes = slurp(mxd_test::data_path("k_equals_n.safetensors"));
  const fs::path p = mxd_test::scratch_path("truncated.safetensors");
  int rejected = 0;
  for (std::size_t len = 0; len < bytes.size(); ++len) {
    spit(p, bytes.substr(0, len));
    rejected += error_of([&] { SafetensorsReader r(p.string()); }) != "<no mxd::Error>";
  }
  CHECK(rejected == static_cast<int>(bytes.size()));
}

TEST_CASE("every single-bit flip in the header is rejected or parses to a valid file") {
  const std::string bytes = slurp(mxd_test::data_path("k_equals_n.safetensors"));
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  const fs::path p = mxd_test::scratch_path("flipped.safetensors");
  int rejected = 0, parsed = 0;
  for (std::size_t byte = 0; byte < 8 + n; ++byte)
    for (int bit = 0; bit < 8; ++bit) {
      std::string b = bytes;
      b[byte] = static_cast<char>(b[byte] ^ (1 << bit));
      spit(p, b);
      try {
        SafetensorsReader r(p.string());
        for (const auto& name : r.names()) {  // whatever parsed must be readable
          const auto& t = r.info(name);
          if (t.dtype == DType::I64) r.read_all<std::int64_t>(name);
          else if (t.dtype == DType::F64) r.read_all<double>(name);
        }
        ++parsed;
      } catch (const mxd::Error&) {
        ++rejected;
      }
    }
  CHECK(rejected + parsed == static_cast<int>(8 * (8 + n)));
  CHECK(rejected > parsed);
}

TEST_CASE("hostile headers are rejected naming what is wrong") {
  const std::string d8(8, '\0');
  CHECK(has(error_of([] {
    spit(mxd_test::scratch_path("tiny.safetensors"), "abc");
    SafetensorsReader r(mxd_test::scratch_path("tiny.safetensors").string());
  }), "too small"));
  {  // length prefix far beyond the file, and beyond the 100 MB limit
    std::string f(8, '\xff');
    f += "{}";
    spit(mxd_test::scratch_path("huge.safetensors"), f);
    CHECK(has(error_of([] { SafetensorsReader r(mxd_test::scratch_path("huge.safetensors").string()); }),
              "exceeds the limit"));
    std::string g(8, '\0');
    g[0] = 100;
    g += "{}";
    spit(mxd_test::scratch_path("long.safetensors"), g);
    CHECK(has(error_of([] { SafetensorsReader r(mxd_test::scratch_path("long.safetensors").string()); }),
              "runs past the end"));
  }
  CHECK(has(open_error("{not json}   "), "not valid JSON"));
  CHECK(has(open_error("[1, 2, 3]"), "does not start with '{'"));
  CHECK(has(open_error(R"({"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})"),
            "duplicate key 'a'"));
  CHECK(has(open_error(R"({"a":{"dtype":"Q8","shape":[1],"data_offsets":[0,8]}})"), "unknown dtype 'Q8'"));
  CHECK(has(open_error(R"({"a":{"dtype":"F64","shape":[-1],"data_offsets":[0,8]}})"),
            "not a non-negative integer"));
  CHECK(has(open_error(R"({"a":{"dtype":"F64","shape":[1.5],"data_offsets":[0,8]}})"),
            "not a non-negative integer"));
  CHECK(has(open_error(R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})"),
            "does not fill its 8-byte range"));
  CHECK(has(open_error(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})"),
            "does not fill"));
  CHECK(has(open_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})"),
            "ranges overlap"));
  CHECK(has(open_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                       std::string(12, '\0')),
            "hole between tensors"));
  CHECK(has(open_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})"), "4 bytes after the last tensor"));
  CHECK(has(open_error(R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}})"), "outside the 8-byte data buffer"));
  CHECK(has(open_error(R"({"__metadata__":{"k":8},"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})"),
            "value of 'k' is not a string"));
  CHECK(has(open_error(R"({"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8],"extra":1}})"),
            "exactly dtype, shape and data_offsets"));
}

TEST_CASE("missing tensors, wrong shapes and int-float reads are named errors") {
  SafetensorsReader r(mxd_test::data_path("relu_basic.safetensors"));
  CHECK(has(error_of([&] { r.info("W_nope"); }), "tensor 'W_nope' not found"));
  CHECK(has(error_of([&] { r.read_all<double>("W_enc", {64, 16}); }), "has shape [16, 64], expected [64, 16]"));
  CHECK(has(error_of([&] { r.read_all<double>("topk_indices"); }), "cannot be read as floating point"));
  CHECK(has(error_of([&] { r.read_all<std::int64_t>("W_enc"); }), "cannot be read as integer"));
  SafetensorsWriter w;
  const double v[1] = {1};
  w.add("a", {1}, v);
  CHECK(has(error_of([&] { w.add("a", {1}, v); }), "added twice"));
  CHECK(has(error_of([&] { w.add("b", {1}, v, DType::I32); }), "cannot be stored as I32"));
}

TEST_CASE("a failed write leaves the existing file intact") {
  const fs::path p = mxd_test::scratch_path("keep.safetensors");
  SafetensorsWriter w;
  const double v[2] = {1, 2};
  w.add("a", {2}, v);
  w.write(p.string());
  const std::string before = slurp(p);
  // The temporary name is taken by a directory, so the write fails before any rename.
  fs::create_directories(p.string() + ".tmp");
  SafetensorsWriter other;
  other.add("b", {1}, v);
  CHECK(has(error_of([&] { other.write(p.string()); }), "cannot open"));
  CHECK(slurp(p) == before);
  fs::remove_all(p.string() + ".tmp");
  CHECK(has(error_of([&] { other.write("/nonexistent_dir/x.safetensors"); }), "cannot open"));
}
