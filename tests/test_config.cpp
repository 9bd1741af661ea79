// SPDX-License-Identifier: MIT
// Config::validate and parse_activation: every bad field is named in the error.
#include <doctest/doctest.h>

#include "testing.hpp"

using mxd::Config;
using mxd_test::error_of;

namespace {
Config valid() {
  Config c;
  c.d_in = 4; c.d_hidden = 8; c.d_out = 4; c.n_experts = 10; c.k = 3;
  return c;
}
}  // namespace

TEST_CASE("a valid config passes validation and counts its parameters") {
  Config c = valid();
  CHECK_NOTHROW(c.validate());
  CHECK(c.n_params() == 4 * 8 + 8 + 8 * 4 + 10 * 4 + 10 + 10 * 4 + 4);
  c.glu = true;
  c.skip = true;
  CHECK(c.n_params() == 4 * 8 + 8 + 8 * 4 + 10 * 4 + 10 + 10 * 4 + 4 + 8 * 4 + 8 + 4 * 4);
}

TEST_CASE("each non-positive size is rejected with its field name and value") {
  auto with = [](auto set) { Config c = valid(); set(c); return error_of([&] { c.validate(); }); };
  CHECK(with([](Config& c) { c.d_in = 0; }).find("Config.d_in = 0") != std::string::npos);
  CHECK(with([](Config& c) { c.d_hidden = -3; }).find("Config.d_hidden = -3") != std::string::npos);
  CHECK(with([](Config& c) { c.d_out = 0; }).find("Config.d_out = 0") != std::string::npos);
  CHECK(with([](Config& c) { c.n_experts = 0; }).find("Config.n_experts = 0") != std::string::npos);
  CHECK(with([](Config& c) { c.k = 0; }).find("Config.k = 0") != std::string::npos);
}

TEST_CASE("k above n_experts is rejected naming both") {
  Config c = valid();
  c.k = 11;
  const std::string e = error_of([&] { c.validate(); });
  CHECK(e.find("Config.k = 11") != std::string::npos);
  CHECK(e.find("n_experts = 10") != std::string::npos);
  c.k = 10;
  CHECK_NOTHROW(c.validate());
}

TEST_CASE("skip with d_in different from d_out is rejected") {
  Config c = valid();
  c.skip = true;
  c.d_out = 5;
  CHECK(error_of([&] { c.validate(); }).find("skip needs d_in == d_out") != std::string::npos);
}

TEST_CASE("an activation outside the enum is rejected") {
  Config c = valid();
  c.activation = static_cast<mxd::Activation>(42);
  CHECK(error_of([&] { c.validate(); }).find("Config.activation = 42") != std::string::npos);
}

TEST_CASE("activation names parse and unknown names are reported") {
  CHECK(mxd::parse_activation("gelu_pytorch_tanh") == mxd::Activation::gelu_tanh);
  for (auto a : {mxd::Activation::relu, mxd::Activation::gelu, mxd::Activation::gelu_tanh,
                 mxd::Activation::sigmoid, mxd::Activation::silu})
    CHECK(mxd::parse_activation(mxd::activation_name(a)) == a);
  CHECK(error_of([] { mxd::parse_activation("tanh"); }).find("'tanh'") != std::string::npos);
}
