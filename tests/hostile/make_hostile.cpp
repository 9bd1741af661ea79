// SPDX-License-Identifier: MIT
// Writes hostile inputs for the `mxd` tool into DIR, one per class of defect a hostile-input
// trial found (and the classes that already passed), and DIR/cases.tsv: one case per line,
// "name<TAB>expected message part<TAB>mxd arguments..." with @ standing for DIR. The runner
// (run_hostile.sh) expects each to end in exit status 1 and one `mxd: error:` line.
//
//     make_hostile DIR
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <mxd/init.hpp>
#include <mxd/io/checkpoint.hpp>

namespace {

using mxd::index_t;
std::string dir;
std::ofstream cases;

void add_case(const std::string& name, const std::string& expect, const std::vector<std::string>& args) {
  cases << name << '\t' << expect;
  for (const auto& a : args) cases << '\t' << a;
  cases << '\n';
}

std::string path(const std::string& file) { return dir + "/" + file; }

// A raw safetensors file: length prefix, header, data.
void raw(const std::string& file, const std::string& header, const std::string& data = "") {
  std::string bytes(8, '\0');
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(n >> (8 * i));
  bytes += header + data;
  std::ofstream(path(file), std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

mxd::Config layer_config() {
  mxd::Config c;
  c.d_in = 4;
  c.d_hidden = 8;
  c.d_out = 4;
  c.n_experts = 16;
  c.k = 2;
  c.activation = mxd::Activation::relu;
  return c;
}

// A valid layer with a batch x [6, 4] (and y [6, 4], so it is an activation file too);
// `edit` changes parameters or x before they are written; `shapes` overrides shapes (data-less).
template <class Edit>
void layer_file(const std::string& file, Edit&& edit,
                const std::vector<std::pair<std::string, std::vector<std::int64_t>>>& shapes = {}) {
  const mxd::Config c = layer_config();
  mxd::Params<float> p(c);
  mxd::init_params(p, 1);
  for (index_t i = 0; i < p.D.size(); ++i) p.D[i] = 0.01f * float(i % 7);
  std::vector<float> x(6 * 4), y(6 * 4);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(float(i));
  for (std::size_t i = 0; i < y.size(); ++i) y[i] = std::cos(float(i));
  edit(p, x, y);
  mxd::io::SafetensorsWriter w;
  mxd::io::add_config_metadata(w, c);
  p.for_each([&](const char* n, const mxd::Tensor<float>& t) {
    for (const auto& [key, shape] : shapes)
      if (key == n) return w.add(n, shape, t.data());
    std::vector<std::int64_t> shape;
    const auto v = mxd::io::reference_layout(n, t, shape);
    w.add(n, shape, v.data());
  });
  w.add("x", {6, 4}, x.data());
  w.add("y", {6, 4}, y.data());
  w.write(path(file));
}

void layer_file(const std::string& file) {
  layer_file(file, [](auto&, auto&, auto&) {});
}

// A valid layer whose metadata says `activation` and `k` (the checks on metadata values).
void layer_file_with_metadata(const std::string& file, const std::string& activation,
                              const std::string& k) {
  layer_file(file);
  mxd::io::SafetensorsReader f(path(file));
  mxd::io::SafetensorsWriter w;
  for (const auto& n : f.names()) {
    const auto v = f.read_all<float>(n);
    w.add(n, f.info(n).shape, v.data());
  }
  w.set_metadata("activation", activation);
  w.set_metadata("k", k);
  w.write(path(file));
}

// Activation pairs x [rows, I], y [rows, O] of zero width or with a planted value.
void acts_file(const std::string& file, std::int64_t rows, std::int64_t I, std::int64_t O,
               float planted = 0, std::int64_t at = -1) {
  mxd::io::SafetensorsWriter w;
  std::vector<float> x(static_cast<std::size_t>(rows * I), 0.5f), y(static_cast<std::size_t>(rows * O), 0.25f);
  if (at >= 0) x[static_cast<std::size_t>(at)] = planted;
  w.add("x", {rows, I}, x.data());
  w.add("y", {rows, O}, y.data());
  w.write(path(file));
}

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_hostile DIR\n");
    return 2;
  }
  dir = argv[1];
  cases.open(path("cases.tsv"));
  const std::string out = "@/out.safetensors";

  // 1. NaN and Inf reaching top-k: in the batch, the gate, its bias, the weights.
  layer_file("nan_x.safetensors", [](auto&, auto& x, auto&) { x[9] = kNaN; });
  add_case("eval_nan_x", "tensor 'x'", {"eval", "@/nan_x.safetensors", out});
  add_case("inspect_nan_x", "x: non-finite value at row 2", {"inspect", "@/nan_x.safetensors", "--data", "@/nan_x.safetensors"});
  add_case("steer_nan_x", "x: non-finite value at row 2", {"steer", "@/nan_x.safetensors", "--data", "@/nan_x.safetensors", "--expert", "1", "--add", "5", "--out", out});
  layer_file("inf_gate.safetensors", [](auto& p, auto&, auto&) { p.G(3, 1) = kInf; });
  add_case("eval_inf_gate", "tensor 'gate'", {"eval", "@/inf_gate.safetensors", out});
  add_case("inspect_inf_gate", "tensor 'gate'", {"inspect", "@/inf_gate.safetensors", "--data", "@/inf_gate.safetensors"});
  layer_file("nan_gate_bias.safetensors", [](auto& p, auto&, auto&) { p.b_gate[5] = kNaN; });
  add_case("eval_nan_gate_bias", "tensor 'gate_bias'", {"eval", "@/nan_gate_bias.safetensors", out});
  layer_file("inf_enc.safetensors", [](auto& p, auto&, auto&) { p.E[3] = -kInf; });
  add_case("eval_inf_w_enc", "tensor 'W_enc'", {"eval", "@/inf_enc.safetensors", out});
  acts_file("nan_acts.safetensors", 40, 4, 4, kNaN, 4 * 7 + 2);
  add_case("train_nan_data", "non-finite value at row 7", {"train", "--data", "@/nan_acts.safetensors", "--d-hidden", "8", "--experts", "16", "--k", "2", "--steps", "20", "--batch", "8", "--out", "@/train_nan"});
  acts_file("inf_acts.safetensors", 40, 4, 4, kInf, 4 * 39);
  add_case("train_inf_heldout", "non-finite value at row 39", {"train", "--data", "@/inf_acts.safetensors", "--d-hidden", "8", "--experts", "16", "--k", "2", "--steps", "2", "--batch", "8", "--out", "@/train_inf"});
  add_case("train_huge_lr", "training stopped at step", {"train", "--d-in", "4", "--d-hidden", "8", "--d-out", "4", "--teacher-hidden", "8", "--experts", "16", "--k", "2", "--steps", "20", "--batch", "8", "--eval-rows", "16", "--lr", "1e300", "--out", "@/train_lr"});
  {  // a checkpoint whose optimizer state holds a NaN, resumed
    const mxd::Config c = layer_config();
    mxd::Params<float> p(c);
    mxd::init_params(p, 1);
    mxd::AdamW<float> opt(p, mxd::AdamWConfig{});
    opt.t = 3;
    mxd::io::save_checkpoint(path("nan_optim.safetensors"), p, &opt);
    // Plant the NaN in the bytes: the writer refuses non-finite values.
    mxd::io::SafetensorsReader f(path("nan_optim.safetensors"));
    const auto& info = f.info("optim.m.W_dec");
    std::fstream io(path("nan_optim.safetensors"), std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(static_cast<std::streamoff>(info.begin + 4));
    io.write(reinterpret_cast<const char*>(&kNaN), 4);
  }
  add_case("train_resume_nan_optim", "optim.m.W_dec", {"train", "--d-in", "4", "--d-hidden", "8", "--d-out", "4", "--baseline", "none", "--k", "2", "--steps", "10", "--resume", "@/nan_optim.safetensors", "--out", "@/train_resume"});

  // 2. Sizes from tensors with a zero dimension: no allocation before the shapes agree.
  layer_file("zero_dec.safetensors", [](auto&, auto&, auto&) {}, {{"W_dec", {0, 268435456}}});
  add_case("inspect_zero_dec", "no zero dimension", {"inspect", "@/zero_dec.safetensors"});
  layer_file("zero_gate.safetensors", [](auto&, auto&, auto&) {}, {{"gate", {2147483647, 0}}});
  add_case("inspect_zero_gate", "no zero dimension", {"inspect", "@/zero_gate.safetensors"});
  layer_file("zero_cond.safetensors", [](auto&, auto&, auto&) {}, {{"W_cond", {4, 0}}});
  add_case("eval_zero_cond", "expected [4, 16]", {"eval", "@/zero_cond.safetensors", out});
  layer_file("zero_bias.safetensors", [](auto&, auto&, auto&) {}, {{"b_dec_out", {0}}});
  add_case("eval_zero_bias", "expected [4]", {"eval", "@/zero_bias.safetensors", out});

  // 3. Overflowing shapes: element counts past 2^63.
  raw("overflow.safetensors", R"({"W_enc":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})");
  add_case("inspect_overflow", "does not fill", {"inspect", "@/overflow.safetensors"});
  raw("overflow3.safetensors", R"({"x":{"dtype":"F64","shape":[3037000500,3037000500,3],"data_offsets":[0,0]}})");
  add_case("train_overflow", "does not fill", {"train", "--data", "@/overflow3.safetensors"});

  // 4. Deeply nested JSON, long and control-character echoes.
  for (int depth : {20000, 1000000}) {
    const std::string name = "deep_" + std::to_string(depth) + ".safetensors";
    raw(name, R"({"W_enc":{"dtype":"F32","shape":)" + std::string(depth, '[') + std::string(depth, ']') +
                  R"(,"data_offsets":[0,0]}})");
    add_case("inspect_deep_" + std::to_string(depth), "nests deeper", {"inspect", "@/" + name});
  }
  raw("deep_offsets.safetensors", R"({"W_enc":{"dtype":"F32","shape":[1],"data_offsets":)" +
                                       std::string(50000, '[') + std::string(50000, ']') + "}}");
  add_case("eval_deep_offsets", "nests deeper", {"eval", "@/deep_offsets.safetensors", out});
  raw("spoof_name.safetensors", "{\"W\\nmxd: error: spoofed\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,8]}}",
      std::string(8, '\0'));
  add_case("eval_spoof_name", "W\\x0amxd: error: spoofed", {"eval", "@/spoof_name.safetensors", out});
  raw("long_dtype.safetensors", R"({"W_enc":{"dtype":")" + std::string(100000, 'Q') + R"(","shape":[1],"data_offsets":[0,4]}})",
      std::string(4, '\0'));
  add_case("eval_long_dtype", "(100000 bytes)", {"eval", "@/long_dtype.safetensors", out});
  raw("long_offset.safetensors", R"({"W_enc":{"dtype":"F32","shape":[1],"data_offsets":[")" + std::string(100000, '7') + R"(",4]}})",
      std::string(4, '\0'));
  add_case("eval_long_offset", "is not a non-negative integer", {"eval", "@/long_offset.safetensors", out});
  // A metadata value with a newline and an escape sequence.
  layer_file_with_metadata("spoof_meta.safetensors", "relu\nmxd: error: \x1b[31mspoofed", "2");
  add_case("eval_spoof_metadata", "unknown name 'relu\\x0amxd: error: \\x1b[31mspoofed'", {"eval", "@/spoof_meta.safetensors", out});

  // 5. Activation files with zero-width x or y.
  acts_file("zero_width_1e9.safetensors", 1000000000, 0, 0);
  add_case("train_zero_width_1e9", "positive widths", {"train", "--data", "@/zero_width_1e9.safetensors", "--out", "@/train_zw"});
  acts_file("zero_width_2p62.safetensors", std::int64_t(1) << 62, 0, 0);
  add_case("train_zero_width_2p62", "positive widths", {"train", "--data", "@/zero_width_2p62.safetensors", "--d-in", "4", "--d-out", "4", "--out", "@/train_zw"});
  acts_file("zero_y.safetensors", 10, 4, 0);
  add_case("train_zero_width_y", "positive widths", {"train", "--data", "@/zero_y.safetensors", "--d-out", "4", "--out", "@/train_zw"});

  // 6. Negative counts on the command line.
  layer_file("layer.safetensors");
  add_case("inspect_top_negative", "--top = -1", {"inspect", "@/layer.safetensors", "--data", "@/layer.safetensors", "--top", "-1"});
  add_case("inspect_rows_negative", "--rows = -5", {"inspect", "@/layer.safetensors", "--data", "@/layer.safetensors", "--rows", "-5"});

  // Kills and checkpoints: user mistakes are `mxd: error:`, exit 1.
  add_case("train_threads_huge", "--threads = 99999999999", {"train", "--threads", "99999999999"});
  add_case("eval_threads_huge", "--threads = 99999999999", {"eval", "@/layer.safetensors", out, "--threads", "99999999999"});
  add_case("train_out_is_file", "--out", {"train", "--steps", "1", "--out", "@/layer.safetensors"});
  add_case("train_out_under_file", "--out", {"train", "--steps", "1", "--out", "@/layer.safetensors/sub"});
  add_case("train_resume_missing", "No such file or directory", {"train", "--steps", "1", "--resume", "@/none/mxd.safetensors", "--out", "@/train_missing"});
  add_case("eval_missing_file", "No such file or directory", {"eval", "@/does_not_exist.safetensors", out});
  add_case("eval_out_unwritable", "cannot open", {"eval", "@/layer.safetensors", "@/no_such_dir/out.safetensors"});

  // Classes that already passed: truncation, header lengths, JSON, tiling, dtypes, metadata.
  {
    std::ifstream in(path("layer.safetensors"), std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(path("truncated.safetensors"), std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() - 9));
  }
  add_case("eval_truncated", "lie outside", {"eval", "@/truncated.safetensors", out});
  std::ofstream(path("empty.safetensors"));
  add_case("eval_empty", "too small for a header", {"eval", "@/empty.safetensors", out});
  {
    std::string b(8, '\xff');
    std::ofstream(path("huge_header.safetensors"), std::ios::binary) << b << "{}";
  }
  add_case("eval_huge_header_length", "exceeds the limit", {"eval", "@/huge_header.safetensors", out});
  raw("not_json.safetensors", "{\"a\": [1, 2,, ]}");
  add_case("eval_not_json", "not valid JSON", {"eval", "@/not_json.safetensors", out});
  raw("duplicate.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
      std::string(4, '\0'));
  add_case("eval_duplicate_key", "duplicate key 'a'", {"eval", "@/duplicate.safetensors", out});
  raw("overlap.safetensors", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
      std::string(8, '\0'));
  add_case("eval_overlap", "ranges overlap", {"eval", "@/overlap.safetensors", out});
  raw("negative_dim.safetensors", R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", std::string(4, '\0'));
  add_case("eval_negative_dim", "not a non-negative integer", {"eval", "@/negative_dim.safetensors", out});
  raw("float_dim.safetensors", R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", std::string(4, '\0'));
  add_case("eval_float_dim", "not a non-negative integer", {"eval", "@/float_dim.safetensors", out});
  raw("array_header.safetensors", "[1, 2, 3]");
  add_case("eval_array_header", "does not start with", {"eval", "@/array_header.safetensors", out});
  layer_file_with_metadata("k_too_big.safetensors", "relu", "17");
  add_case("eval_k_above_experts", "exceeds Config.n_experts", {"eval", "@/k_too_big.safetensors", out});
  raw("int_x.safetensors", R"({"x":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]},"y":{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]}})",
      std::string(32, '\0'));
  add_case("train_int_data", "cannot be read as floating point", {"train", "--data", "@/int_x.safetensors", "--out", "@/train_int"});
  add_case("steer_bad_expert", "expert", {"steer", "@/layer.safetensors", "--data", "@/layer.safetensors", "--expert", "99", "--add", "1", "--out", out});
  add_case("probe_missing_labels", "not found", {"probe", "--features", "@/layer.safetensors", "--labels", "@/layer.safetensors"});
  add_case("train_bad_number", "is not an integer", {"train", "--steps", "1e3x"});
  return 0;
}
