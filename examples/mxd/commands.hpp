// SPDX-License-Identifier: MIT
// The subcommands of the mxd tool. Each takes argv from the subcommand's name on and returns
// the exit status; errors are thrown as mxd::Error and reported by main.
#pragma once

namespace mxd::cli {

int run_eval(int argc, char** argv);  // eval.cpp
int run_demo(int argc, char** argv);  // demo.cpp
int run_train(int argc, char** argv); // train.cpp: the built-in default job
int run_bench(int argc, char** argv); // bench.cpp: timings for compare_torch.py
int run_inspect(int argc, char** argv);  // interp.cpp
int run_steer(int argc, char** argv);    // interp.cpp
int run_probe(int argc, char** argv);    // interp.cpp

}  // namespace mxd::cli
