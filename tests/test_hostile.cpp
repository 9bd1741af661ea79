// SPDX-License-Identifier: MIT
// Hostile inputs and the NaN/Inf policy: every crash or huge allocation a hostile-input trial
// found, fed the same kind of input, ends in an mxd::Error naming what is wrong; non-finite
// values are refused where they enter; checkpoint sets survive a kill at any point.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <mxd/baselines/transcoder.hpp>
#include <mxd/init.hpp>
#include <mxd/interp/usage.hpp>
#include <mxd/io/checkpoint.hpp>
#include <mxd/train/data.hpp>

#include "testing.hpp"

using namespace mxd;
using mxd_test::error_of;
using mxd_test::scratch_path;
namespace fs = std::filesystem;

namespace {

bool has(const std::string& message, const std::string& part) {
  return message.find(part) != std::string::npos;
}

Config small_config() {
  Config c;
  c.d_in = 4;
  c.d_hidden = 8;
  c.d_out = 4;
  c.n_experts = 40;
  c.k = 3;
  c.activation = Activation::gelu;
  return c;
}

// A file from a raw header and data buffer, the length prefix computed.
std::string write_raw(const std::string& name, const std::string& header, const std::string& data) {
  std::string bytes(8, '\0');
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(n >> (8 * i));
  bytes += header + data;
  const std::string path = scratch_path(name).string();
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

// A layer file whose tensors are `p`'s, with shapes overridden by `shapes` (zero-sized data).
std::string layer_with(const std::string& name, const Params<float>& p,
                       const std::vector<std::pair<std::string, std::vector<std::int64_t>>>& shapes) {
  io::SafetensorsWriter w;
  io::add_config_metadata(w, p.config);
  p.for_each([&](const char* n, const Tensor<float>& t) {
    for (const auto& [key, shape] : shapes)
      if (key == n) return w.add(n, shape, t.data());  // a zero dimension: no data needed
    std::vector<std::int64_t> shape;
    const auto v = io::reference_layout(n, t, shape);
    w.add(n, shape, v.data());
  });
  const std::string path = scratch_path(name).string();
  w.write(path);
  return path;
}

}  // namespace

TEST_CASE("a NaN or Inf gate score is an error naming its row and expert, for any thread count") {
  const Config c = small_config();
  const Params<float> p = mxd_test::random_params<float>(c, 1);
  for (int threads : {1, 2}) {
    Tensor<float> x = mxd_test::random_matrix<float>(40, c.d_in, 2), y(40, c.d_out);
    Workspace<float> ws;
    ws.ctx.threads = threads;
    x(33, 1) = std::numeric_limits<float>::quiet_NaN();  // every score of row 33 is NaN
    x(17, 2) = std::numeric_limits<float>::infinity();   // and of row 17, Inf or NaN
    CHECK(error_of([&] { forward(p, x.view(), y.view(), ws); }) ==
          "gate scores: non-finite value at row 17 (expert 0)");
  }
  // An Inf gate bias: the one expert's score, in every row.
  Params<float> q = p;
  q.b_gate[29] = -std::numeric_limits<float>::infinity();
  Tensor<float> x = mxd_test::random_matrix<float>(3, c.d_in, 3), y(3, c.d_out);
  Workspace<float> ws;
  CHECK(error_of([&] { forward(q, x.view(), y.view(), ws); }) ==
        "gate scores: non-finite value at row 0 (expert 29)");
  // The transcoder's top-k is the same primitive.
  TranscoderParams<float> tp(TranscoderConfig{4, 4, 16, 2, false});
  init_transcoder(tp, 1);
  x(2, 0) = std::numeric_limits<float>::quiet_NaN();
  TranscoderWorkspace<float> tws;
  CHECK(error_of([&] { transcoder_forward(tp, x.view(), y.view(), tws); }) ==
        "gate scores: non-finite value at row 2 (expert 0)");
}

TEST_CASE("Tensor::resize and TensorInfo::numel refuse overflowing shapes before multiplying") {
  Tensor<float> t;
  CHECK(has(error_of([&] { t.resize(index_t(1) << 40, index_t(1) << 40); }), "overflows"));
  CHECK(has(error_of([&] { t.resize(index_t(1) << 62, 1); }), "overflows"));  // bytes overflow
  io::TensorInfo info;
  info.shape = {std::int64_t(1) << 40, std::int64_t(1) << 40};
  CHECK(has(error_of([&] { info.numel(); }), "overflows"));
}

TEST_CASE("layer shapes are checked against each other before anything is allocated") {
  const Params<float> p = mxd_test::random_params<float>(small_config(), 4);
  // A 1 KB file whose W_dec claims 2^28 outputs with no data: refused by shape, not allocated.
  const std::string wide = layer_with("wide_dec.safetensors", p, {{"W_dec", {0, 268435456}}});
  io::SafetensorsReader f(wide);
  CHECK(has(error_of([&] { io::read_config(f); }), "must have no zero dimension"));
  const std::string gate = layer_with("huge_gate.safetensors", p, {{"gate", {2147483647, 0}}});
  io::SafetensorsReader g(gate);
  CHECK(has(error_of([&] { io::read_config(g); }), "must have no zero dimension"));
  const std::string cond = layer_with("bad_cond.safetensors", p, {{"W_cond", {0, 40}}});
  io::SafetensorsReader h(cond);
  CHECK(error_of([&] { io::read_config(h); }) ==
        "tensor 'W_cond' in " + cond + " has shape [0, 40], expected [4, 40]");
}

TEST_CASE("deeply nested JSON is refused while parsing and messages stay short and one line") {
  // Depth 20,000 and 1,000,000 in a dimension: refused at depth 8, no recursion over it.
  for (int depth : {20000, 1000000}) {
    const std::string header = "{\"x\":{\"dtype\":\"F32\",\"shape\":" + std::string(depth, '[') +
                               std::string(depth, ']') + ",\"data_offsets\":[0,0]}}";
    const std::string path = write_raw("deep.safetensors", header, "");
    const std::string e = error_of([&] { io::SafetensorsReader r(path); });
    CHECK(has(e, "nests deeper than 8 levels"));
    CHECK(e.size() < 200);
  }
  // A name with a newline cannot print a second "mxd: error:" line; long names are cut.
  const std::string spoof = "a\nmxd: error: spoofed";
  const std::string path = write_raw("spoof.safetensors",
                                     "{\"" + std::string("a\\nmxd: error: spoofed") +
                                         "\":{\"dtype\":\"F99\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                                     std::string(4, '\0'));
  const std::string e = error_of([&] { io::SafetensorsReader r(path); });
  CHECK(has(e, "a\\x0amxd: error: spoofed"));
  CHECK(e.find('\n') == std::string::npos);
  const std::string long_name(100000, 'n');
  const std::string path2 = write_raw(
      "long_name.safetensors",
      "{\"" + long_name + "\":{\"dtype\":\"F32\",\"shape\":[[[1]]],\"data_offsets\":[0,4]}}",
      std::string(4, '\0'));
  const std::string e2 = error_of([&] { io::SafetensorsReader r(path2); });
  CHECK(has(e2, "(100000 bytes)"));
  CHECK(e2.size() < 400);
}

TEST_CASE("activation files with zero-width x or y are refused before any row is indexed") {
  const float none[1] = {};
  for (std::int64_t rows : {std::int64_t(1000000000), std::int64_t(1) << 62}) {
    io::SafetensorsWriter w;
    w.add("x", {rows, 0}, none);
    w.add("y", {rows, 0}, none);
    const std::string path = scratch_path("zero_width.safetensors").string();
    w.write(path);
    CHECK(has(error_of([&] { train::ActivationFiles<float> d({path}, 0.05, 0); }),
              "must have positive widths"));
  }
}

TEST_CASE("Usage::most_used refuses a negative count") {
  interp::Usage u(5);
  CHECK(has(error_of([&] { u.most_used(-1); }), "n = -1 must be >= 0"));
  CHECK(u.most_used(0).empty());
  CHECK(u.most_used(99).size() == 5);
}

TEST_CASE("non-finite weights, moments and activations are refused where they are loaded") {
  const Config c = small_config();
  Params<float> p = mxd_test::random_params<float>(c, 5);
  p.E(1, 6) = std::numeric_limits<float>::infinity();
  io::SafetensorsWriter w;
  io::add_config_metadata(w, c);
  io::add_params(w, p);
  const std::string path = scratch_path("inf_enc.safetensors").string();
  w.write(path);
  io::SafetensorsReader f(path);
  const Config rc = io::read_config(f);
  CHECK(error_of([&] { io::load_params<float>(f, rc); }) ==
        "tensor 'W_enc' in " + path + ": non-finite value inf at row 1 (column 6)");

  // Checkpoints refuse to be written with a NaN anywhere; a negative second moment is refused.
  Params<float> q = mxd_test::random_params<float>(c, 6);
  AdamW<float> opt(q, AdamWConfig{});
  opt.m.C(3, 2) = std::numeric_limits<float>::quiet_NaN();
  const std::string ck = scratch_path("nan_moment.safetensors").string();
  CHECK(has(error_of([&] { io::save_checkpoint(ck, q, &opt); }), "checkpoint: optim.m.W_cond"));
  CHECK(!fs::exists(ck));
  opt.m.C(3, 2) = 0;
  opt.v.b_gate[7] = -1;
  io::save_checkpoint(ck, q, &opt);
  io::SafetensorsReader cf(ck);
  AdamW<float> back(q, AdamWConfig{});
  CHECK(has(error_of([&] { io::load_optimizer(cf, back); }), "optim.v.gate_bias holds the negative value -1"));

  // A NaN in a row of an activation file: an error naming file, tensor and row.
  std::vector<float> x(10 * 3, 1.f), y(10 * 2, 1.f);
  y[6 * 2 + 1] = std::numeric_limits<float>::quiet_NaN();
  io::SafetensorsWriter aw;
  aw.add("x", {10, 3}, x.data());
  aw.add("y", {10, 2}, y.data());
  const std::string acts = scratch_path("nan_acts.safetensors").string();
  aw.write(acts);
  train::ActivationFiles<float> d({acts}, 0.2, 0);
  Tensor<float> bx, by;
  CHECK(error_of([&] { d.train_batch(0, 8, bx, by); }) ==
        acts + ": y: non-finite value at row 6 (column 1)");
}

TEST_CASE("a non-finite gradient stops AdamW before any weight, moment or step changes") {
  const Config c = small_config();
  Params<float> p = mxd_test::random_params<float>(c, 7);
  AdamW<float> opt(p, AdamWConfig{});
  Grads<float> g(c);
  g.set_zero();
  g.D(5, 3) = std::numeric_limits<float>::infinity();
  const Params<float> before = p;
  Context<cpu> ctx;
  CHECK(error_of([&] { opt.step(p, g, ctx); }) ==
        "gradient of W_dec: non-finite value at row 5 (column 3); no weight was updated");
  CHECK(opt.t == 0);
  CHECK(std::equal(p.E.data(), p.E.data() + p.E.size(), before.E.data()));
}

TEST_CASE("a missing file's error carries the operating system's reason") {
  CHECK(has(error_of([] { io::SafetensorsReader r("/nonexistent/dir/x.safetensors"); }),
            "No such file or directory"));
}

TEST_CASE("a checkpoint set is committed whole: a kill leaves the previous set to resume from") {
  const fs::path dir = scratch_path("ckpt_dir");
  fs::remove_all(dir);
  fs::create_directories(dir);
  io::CheckpointDir cd(dir.string());
  CHECK(cd.latest().step == -1);
  auto write_pair = [](const std::string& text) {
    return [text](const std::string& folder) {
      for (const char* n : {"a.safetensors", "b.safetensors"})
        std::ofstream(folder + "/" + n) << text;
    };
  };
  cd.commit(5, write_pair("five"));
  cd.commit(10, write_pair("ten"));
  auto read = [](const std::string& p) {
    std::ifstream in(p);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  io::CheckpointDir::Set s = cd.latest();
  CHECK(s.step == 10);
  CHECK(read(s.file("a.safetensors")) == "ten");
  CHECK(read((dir / "b.safetensors").string()) == "ten");  // the stable name, a hard link
  // A commit killed after writing its set but before the manifest: the set of step 10 stays.
  CHECK_THROWS_AS(cd.commit(15, [](const std::string& folder) {
    std::ofstream(folder + "/a.safetensors") << "fifteen";
    throw Error("killed");
  }), Error);
  s = cd.latest();
  CHECK(s.step == 10);
  CHECK(read(s.file("a.safetensors")) == "ten");
  CHECK(read(s.file("b.safetensors")) == "ten");
  cd.commit(15, write_pair("fifteen"));
  CHECK(cd.latest().step == 15);
  int sets = 0;
  for (const auto& e : fs::directory_iterator(dir)) sets += e.is_directory();
  CHECK(sets == 1);  // older and unfinished sets removed
  // A manifest naming something outside the directory is refused.
  std::ofstream(cd.manifest()) << R"({"step": 1, "dir": "..", "files": ["a.safetensors"]})";
  CHECK(has(error_of([&] { cd.latest(); }), "is not a directory name"));
}
