// SPDX-License-Identifier: MIT
// mxd: the command-line tool. With no arguments it runs the built-in default job.
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <new>
#include <string>

#include <mxd/error.hpp>

#include "cli.hpp"
#include "commands.hpp"

namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* summary;
};

const Command commands[] = {
    {"eval", mxd::cli::run_eval, "forward, backward and loss of a layer stored in a safetensors file"},
    {"train", mxd::cli::run_train, "train an MxD and a parameter-matched TopK transcoder, compare them"},
    {"inspect", mxd::cli::run_inspect, "config and expert usage of a checkpoint"},
    {"steer", mxd::cli::run_steer, "outputs with and without forcing one expert on"},
    {"probe", mxd::cli::run_probe, "sparse probing of features against class labels"},
    {"bench", mxd::cli::run_bench, "median forward, backward and training-step times of a layer"},
    {"demo", mxd::cli::run_demo, "one forward and backward of a built-in layer, with timings"},
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "mxd: Mixture of Decoders layers (arXiv 2505.21364) from the command line.\n\n"
               "usage: mxd [COMMAND [ARGS...]]\n"
               "       mxd COMMAND --help\n\n"
               "With no command, runs `mxd train` on its built-in default (under a minute on an\n"
               "idle 2-core machine; see mxd train --help).\n\ncommands:\n");
  for (const Command& c : commands) std::fprintf(out, "  %-8s %s\n", c.name, c.summary);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2) return mxd::cli::run_train(argc, argv);
    const std::string name = argv[1];
    if (name == "-h" || name == "--help" || name == "help") {
      usage(stdout);
      return 0;
    }
    for (const Command& c : commands)
      if (name == c.name) return c.run(argc, argv);
    std::fprintf(stderr, "mxd: unknown command '%s'\n\n", name.c_str());
    usage(stderr);
    return 2;
  } catch (const mxd::Error& e) {
    std::fprintf(stderr, "mxd: error: %s\n", mxd::cli::one_line(e.what()).c_str());
    return 1;
  } catch (const std::bad_alloc&) {  // a size the machine cannot hold: the user's to change
    std::fprintf(stderr, "mxd: error: out of memory\n");
    return 1;
  } catch (const std::filesystem::filesystem_error& e) {  // a path the user gave: unusable
    std::fprintf(stderr, "mxd: error: %s\n", mxd::cli::one_line(e.what()).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mxd: internal error: %s\n", mxd::cli::one_line(e.what()).c_str());
    return 3;
  }
}
