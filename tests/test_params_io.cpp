// SPDX-License-Identifier: MIT
// Parameters and configs in safetensors: reference names and layouts, round trips, and errors.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>

#include <mxd/baselines/transcoder.hpp>

#include "testing.hpp"

using namespace mxd;
using namespace mxd_test;
namespace fs = std::filesystem;

namespace {

Config small_config() {
  Config c;
  c.d_in = 3; c.d_hidden = 5; c.d_out = 3; c.n_experts = 7; c.k = 2;
  c.activation = Activation::silu; c.glu = true; c.skip = true;
  return c;
}

// Writes a copy of `p` with `edit` applied to the writer before writing.
template <class Edit>
std::string write_with(const Params<double>& p, const std::string& file, Edit edit) {
  io::SafetensorsWriter w;
  io::add_config_metadata(w, p.config);
  io::add_params(w, p, io::DType::F64);
  edit(w);
  const std::string path = scratch_path(file).string();
  w.write(path);
  return path;
}

}  // namespace

TEST_CASE("save then load gives back the same config and bits") {
  const Params<double> p = random_params<double>(small_config(), 5);
  const std::string path = scratch_path("roundtrip.safetensors").string();
  io::save_params(path, p);
  io::SafetensorsReader f(path);
  const Config c = io::read_config(f);
  CHECK(c.d_in == 3);
  CHECK(c.d_hidden == 5);
  CHECK(c.n_experts == 7);
  CHECK(c.k == 2);
  CHECK(c.activation == Activation::silu);
  CHECK(c.glu);
  CHECK(c.skip);
  const Params<double> q = io::load_params<double>(f, c);
  std::vector<const Tensor<double>*> a, b;
  p.for_each([&](const char*, const Tensor<double>& t) { a.push_back(&t); });
  q.for_each([&](const char*, const Tensor<double>& t) { b.push_back(&t); });
  REQUIRE(a.size() == 10);
  for (std::size_t i = 0; i < a.size(); ++i)
    CHECK(std::memcmp(a[i]->data(), b[i]->data(), a[i]->bytes()) == 0);
}

TEST_CASE("files use the reference layouts: W_cond is [d_out, n_experts] and biases are 1-D") {
  const Params<double> p = random_params<double>(small_config(), 6);
  const std::string path = scratch_path("layout.safetensors").string();
  io::save_params(path, p);
  io::SafetensorsReader f(path);
  CHECK(f.info("W_cond").shape == std::vector<std::int64_t>{3, 7});
  CHECK(f.info("gate").shape == std::vector<std::int64_t>{7, 3});
  CHECK(f.info("gate_bias").shape == std::vector<std::int64_t>{7});
  CHECK(f.info("W_glu.bias").shape == std::vector<std::int64_t>{5});
  CHECK(f.info("W_skip.weight").shape == std::vector<std::int64_t>{3, 3});
  const auto w_cond = f.read_all<double>("W_cond");
  CHECK(w_cond[1 * 7 + 4] == p.C(4, 1));  // W_cond[o, n] = C[n, o]
}

TEST_CASE("the authors' unused b_dec is accepted and ignored") {
  const Params<double> p = random_params<double>(small_config(), 7);
  const double b_dec[3] = {1, 2, 3};
  const std::string path =
      write_with(p, "b_dec.safetensors", [&](io::SafetensorsWriter& w) { w.add("b_dec", {3}, b_dec); });
  io::SafetensorsReader f(path);
  CHECK_NOTHROW(io::load_params<double>(f, io::read_config(f)));
}

TEST_CASE("glu and skip are inferred from the tensors when metadata lacks them") {
  Config c = small_config();
  const Params<double> p = random_params<double>(c, 8);
  io::SafetensorsWriter w;
  w.set_metadata("activation", "gelu_pytorch_tanh");
  w.set_metadata("k", "3");
  io::add_params(w, p, io::DType::F32);
  const std::string path = scratch_path("nometa.safetensors").string();
  w.write(path);
  io::SafetensorsReader f(path);
  const Config r = io::read_config(f);
  CHECK(r.glu);
  CHECK(r.skip);
  CHECK(r.k == 3);
  CHECK(r.activation == Activation::gelu_tanh);
}

TEST_CASE("bad metadata and missing or mis-shaped tensors are named in the error") {
  const Params<double> p = random_params<double>(small_config(), 9);
  auto config_error = [&](const char* file, auto edit) {
    const std::string path = write_with(p, file, edit);
    io::SafetensorsReader f(path);
    return error_of([&] { io::load_params<double>(f, io::read_config(f)); });
  };
  CHECK(config_error("k_text.safetensors", [](io::SafetensorsWriter& w) { w.set_metadata("k", "x2"); })
            .find("'k' = 'x2'") != std::string::npos);
  CHECK(config_error("k_big.safetensors", [](io::SafetensorsWriter& w) { w.set_metadata("k", "8"); })
            .find("Config.k = 8") != std::string::npos);
  CHECK(config_error("act.safetensors",
                     [](io::SafetensorsWriter& w) { w.set_metadata("activation", "swish"); })
            .find("'swish'") != std::string::npos);
  CHECK(config_error("glu_flag.safetensors", [](io::SafetensorsWriter& w) { w.set_metadata("glu", "2"); })
            .find("'glu' = '2'") != std::string::npos);

  // A file without W_glu.weight whose metadata claims glu = 1.
  Config plain = small_config();
  plain.glu = false;
  const Params<double> q = random_params<double>(plain, 10);
  const std::string path = write_with(q, "glu_missing.safetensors",
                                      [](io::SafetensorsWriter& w) { w.set_metadata("glu", "1"); });
  io::SafetensorsReader f(path);
  CHECK(error_of([&] { io::read_config(f); }).find("'W_glu.weight' is missing") != std::string::npos);

  // A mis-shaped bias.
  io::SafetensorsWriter w;
  io::add_config_metadata(w, plain);
  plain.d_hidden = 6;
  const Params<double> wrong(plain);
  plain.d_hidden = 5;
  q.for_each([&](const char* name, const Tensor<double>& t) {
    std::vector<std::int64_t> shape;
    const Tensor<double>& src = std::string(name) == "b_enc" ? wrong.b_enc : t;
    const auto v = io::reference_layout(name, src, shape);
    w.add(name, shape, v.data());
  });
  const std::string bad = scratch_path("bad_bias.safetensors").string();
  w.write(bad);
  io::SafetensorsReader g(bad);
  CHECK(error_of([&] { io::load_params<double>(g, io::read_config(g)); }).find("b_enc") !=
        std::string::npos);

  io::SafetensorsWriter empty;
  const std::string none = scratch_path("none.safetensors").string();
  empty.write(none);
  io::SafetensorsReader h(none);
  CHECK(error_of([&] { io::read_config(h); }).find("W_enc") != std::string::npos);
}

namespace {

// "name[rows,cols]" and the flags u (per unit), b (bias), t (transposed in files) of every
// parameter a set of config c has, in for_each order.
template <class Set, class Cfg>
std::string summary(const Cfg& c) {
  std::string s;
  Set::describe(c, [&](const ParamDesc& d) {
    s += std::string(d.name) + "[" + std::to_string(d.rows) + "," + std::to_string(d.cols) + "]" +
         (d.per_unit ? "u" : "") + (d.bias ? "b" : "") + (d.transposed ? "t" : "") + " ";
  });
  return s;
}

}  // namespace

TEST_CASE("parameter descriptors: one list gives names, shapes, per-expert tensors and file layouts") {
  const Config c = small_config();  // GLU and skip: every parameter an MxD can have
  CHECK(summary<Params<float>>(c) ==
        "W_enc[3,5] b_enc[1,5]b W_dec[5,3] gate[7,3]u gate_bias[1,7]ub W_cond[7,3]ut "
        "b_dec_out[1,3]b W_glu.weight[5,3] W_glu.bias[1,5]b W_skip.weight[3,3] ");
  Config plain = c;
  plain.glu = plain.skip = false;
  CHECK(summary<Params<float>>(plain) ==
        "W_enc[3,5] b_enc[1,5]b W_dec[5,3] gate[7,3]u gate_bias[1,7]ub W_cond[7,3]ut "
        "b_dec_out[1,3]b ");
  // The tensors have the descriptors' shapes; files the transposed and 1-D shapes.
  const Params<float> p(c);
  std::string shapes;
  p.for_each_param([&](const ParamDesc& d, const Tensor<float>& t) {
    CHECK(t.rows() == d.rows);
    CHECK(t.cols() == d.cols);
    shapes += io::detail::shape_str(d.file_shape()) + " ";
  });
  CHECK(shapes == "[3, 5] [5] [5, 3] [7, 3] [7] [3, 7] [3] [5, 3] [5] [3, 3] ");

  TranscoderConfig tc;
  tc.d_in = tc.d_out = 6;
  tc.n_latents = 20;
  tc.k = 4;
  tc.skip = true;
  CHECK(summary<TranscoderParams<float>>(tc) ==
        "W_enc[20,6]ut b_enc[1,20]ub W_dec[20,6]u b_dec_out[1,6]b W_skip.weight[6,6] ");

  // By name, for callers that hold only a name.
  CHECK(Params<float>::transposed_in_file("W_cond"));
  CHECK(!Params<float>::transposed_in_file("W_enc"));
  CHECK(TranscoderParams<float>::transposed_in_file("W_enc"));
  CHECK(is_bias("gate_bias"));
  CHECK(is_bias("W_glu.bias"));
  CHECK(!is_bias("gate"));
  CHECK(!is_bias("no such tensor"));
  CHECK(Params<double>::find("W_cond").per_unit);
  CHECK(Params<double>::find("gate_bias").unit_size() == 1);
  CHECK(std::string(Params<double>::find("no such tensor").name).empty());
}
