// SPDX-License-Identifier: MIT
// mxd eval IN.safetensors OUT.safetensors [--batch BATCH.safetensors] [--dtype f64|f32] [--threads N]
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <mxd/io/params_io.hpp>
#include <mxd/mxd.hpp>

#include "cli.hpp"
#include "commands.hpp"

namespace mxd::cli {
namespace {

const char* const eval_help =
    "usage: mxd eval IN.safetensors OUT.safetensors [--batch BATCH.safetensors]\n"
    "                [--dtype f64|f32] [--threads N]\n\n"
    "Runs one MxD layer on a batch and writes what it computes.\n\n"
    "IN holds the layer's parameters under the authors' names and layouts\n"
    "  W_enc [I,H], b_enc [H], W_dec [H,O], gate [N,I], gate_bias [N], W_cond [O,N],\n"
    "  b_dec_out [O], and with glu W_glu.weight [H,I], W_glu.bias [H], with skip W_skip.weight [O,I]\n"
    "  (an unused b_dec is ignored), the input x [B,I], and optionally dy [B,O] and target [B,O]\n"
    "  (or these three from BATCH: then IN needs only the layer, e.g. a training checkpoint).\n"
    "  Its __metadata__ gives activation (relu|gelu|gelu_tanh|sigmoid|silu), k, and optionally\n"
    "  glu and skip (0/1; else inferred from the tensors). Sizes come from the shapes.\n"
    "  Other keys are ignored; missing or mis-shaped ones are an error.\n\n"
    "OUT receives\n"
    "  y [B,O], topk_indices [B,k] (I64), topk_values [B,k]   always;\n"
    "  grad.x [B,I] and grad.NAME for every parameter         when dy is given (L = sum(y * dy));\n"
    "  loss_nmse_ref [1] and dloss_dy [B,O]                    when target is given\n"
    "  (loss_nmse_ref = mean over elements of (y - target)^2 / ||target_row||_2).\n\n"
    "options:\n"
    "  --batch FILE      read x, dy and target from FILE instead of IN\n"
    "  --dtype f64|f32   precision of the computation and of OUT's floats (default f64)\n"
    "  --threads N       CPU threads (default: all cores); results are identical for any N\n";

// The layer from `in`, x (and dy, target) from `in` too or from `--batch`.
template <class T>
void eval(io::SafetensorsReader& layer, io::SafetensorsReader& in, const std::string& out_path,
          int threads) {
  const Config cfg = io::read_config(layer);
  const Params<T> p = io::load_params<T>(layer, cfg);
  MXD_CHECK(in.contains("x"), in.path(), " has no batch x [B, ", cfg.d_in, "]",
            &in == &layer ? " (give one with --batch FILE)" : "");
  const Tensor<T> x = io::read_matrix<T>(in, "x", cfg.d_in);
  const index_t B = x.rows();
  MXD_CHECK(B > 0, "x in ", in.path(), " has no rows");
  const io::DType dtype = io::dtype_of<T>();

  Workspace<T> ws;
  ws.ctx.threads = threads;
  Tensor<T> y(B, cfg.d_out);
  forward<T>(p, x.view(), y.view(), ws);

  io::SafetensorsWriter w;
  io::add_config_metadata(w, cfg);
  w.add("y", {B, cfg.d_out}, y.data(), dtype);
  std::vector<std::int64_t> idx(ws.topk_idx.data(), ws.topk_idx.data() + ws.topk_idx.size());
  w.add("topk_indices", {B, cfg.k}, idx.data(), io::DType::I64);
  w.add("topk_values", {B, cfg.k}, ws.topk_val.data(), dtype);

  if (in.contains("dy")) {
    const Tensor<T> dy = io::read_matrix<T>(in, "dy", cfg.d_out);
    MXD_CHECK(dy.rows() == B, "dy in ", in.path(), " has ", dy.rows(), " rows, x has ", B);
    Grads<T> g(cfg);
    Tensor<T> dx(B, cfg.d_in);
    backward<T>(p, x.view(), dy.view(), ws, g, dx.view());
    w.add("grad.x", {B, cfg.d_in}, dx.data(), dtype);
    io::add_params(w, g, dtype, "grad.");
  }
  if (in.contains("target")) {
    const Tensor<T> t = io::read_matrix<T>(in, "target", cfg.d_out);
    MXD_CHECK(t.rows() == B, "target in ", in.path(), " has ", t.rows(), " rows, x has ", B);
    Tensor<T> dl(B, cfg.d_out);
    const T l = static_cast<T>(loss<T>(Loss::nmse_ref, y.view(), t.view(), dl.view()));
    w.add("loss_nmse_ref", {1}, &l, dtype);
    w.add("dloss_dy", {B, cfg.d_out}, dl.data(), dtype);
  }
  w.write(out_path);
  std::printf("mxd eval: %lld rows, %s, k = %lld of %lld experts -> %s\n",
              static_cast<long long>(B), activation_name(cfg.activation),
              static_cast<long long>(cfg.k), static_cast<long long>(cfg.n_experts),
              out_path.c_str());
}

}  // namespace

int run_eval(int argc, char** argv) {
  Args args(argc, argv, 2, {"batch", "dtype", "threads"});
  if (args.help()) {
    std::fputs(eval_help, stdout);
    return 0;
  }
  MXD_CHECK(args.positional().size() == 2, "mxd eval takes IN.safetensors and OUT.safetensors, got ",
            args.positional().size(), " paths (see mxd eval --help)");
  // OUT is replaced only after IN is read, but a layer overwritten by its own outputs is lost.
  const std::string& out = args.positional()[1];
  for (const std::string& in : {args.positional()[0], args.get("batch", "")}) {
    std::error_code ec;
    MXD_CHECK(in.empty() || !std::filesystem::equivalent(in, out, ec), "OUT = '", out,
              "' is also an input ('", in, "'): mxd eval writes its outputs to another file");
  }
  const std::string dtype = args.get("dtype", "f64");
  const int threads = threads_arg(args);
  io::SafetensorsReader layer(args.positional()[0]);
  std::unique_ptr<io::SafetensorsReader> batch;
  if (args.has("batch")) batch = std::make_unique<io::SafetensorsReader>(args.get("batch", ""));
  io::SafetensorsReader& in = batch ? *batch : layer;
  if (dtype == "f64")
    eval<double>(layer, in, out, threads);
  else if (dtype == "f32")
    eval<float>(layer, in, out, threads);
  else
    throw Error("--dtype = '" + dtype + "' is not f64 or f32");
  return 0;
}

}  // namespace mxd::cli
