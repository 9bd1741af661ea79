// SPDX-License-Identifier: MIT
// Losses: the reference normalized MSE against the golden files; MSE and FVU by hand and
// by finite differences.
#include <doctest/doctest.h>

#include "testing.hpp"

using namespace mxd;
using namespace mxd_test;

TEST_CASE_TEMPLATE("nmse_ref and its gradient match the golden files", T, float, double) {
  for (const std::string& name : golden_cases()) {
    CAPTURE(name);
    io::SafetensorsReader f(data_path(name + ".safetensors"));
    const Tensor<T> y = io::read_matrix<T>(f, "y"), t = io::read_matrix<T>(f, "target");
    Tensor<T> dy(y.rows(), y.cols());
    const double l = loss<T>(Loss::nmse_ref, y.view(), t.view(), dy.view());
    const auto l_ref = f.read_all<double>("loss_nmse_ref", {1});
    const auto dy_ref = f.read_all<double>("dloss_dy");
    CHECK(std::abs(l - l_ref[0]) <= tolerance<T>() * std::abs(l_ref[0]));
    CHECK(rel_error(dy.data(), dy_ref.data(), dy_ref.size()) <= tolerance<T>());
  }
}

TEST_CASE("mse, sse and fvu equal their definitions on a hand-made case") {
  Tensor<double> y(2, 2), t(2, 2);
  // t = [[1, 2], [3, 6]], y = [[1, 3], [2, 6]]: errors 0, 1, -1, 0.
  t[0] = 1; t[1] = 2; t[2] = 3; t[3] = 6;
  y[0] = 1; y[1] = 3; y[2] = 2; y[3] = 6;
  CHECK(loss<double>(Loss::mse, y.view(), t.view()) == doctest::Approx(2.0 / 4));
  // sse (SAELens's): each row's sum, 1 and 1, averaged over the 2 rows.
  CHECK(loss<double>(Loss::sse, y.view(), t.view()) == doctest::Approx(2.0 / 2));
  // column means 2 and 4: variance sum = 1 + 1 + 4 + 4 = 10.
  CHECK(loss<double>(Loss::fvu, y.view(), t.view()) == doctest::Approx(2.0 / 10));
  // nmse_ref: row norms sqrt(5), sqrt(45).
  CHECK(loss<double>(Loss::nmse_ref, y.view(), t.view()) ==
        doctest::Approx((1 / std::sqrt(5.0) + 1 / std::sqrt(45.0)) / 4));
}

TEST_CASE("every loss gradient matches central finite differences") {
  for (Loss kind : {Loss::nmse_ref, Loss::mse, Loss::sse, Loss::fvu}) {
    CAPTURE(loss_name(kind));
    Tensor<double> y = random_matrix<double>(3, 4, 21), t = random_matrix<double>(3, 4, 22);
    Tensor<double> dy(3, 4), scratch;
    loss<double>(kind, y.view(), t.view(), dy.view());
    for (index_t i = 0; i < y.size(); ++i) {
      const double keep = y[i], eps = 1e-6;
      y[i] = keep + eps;
      const double up = loss<double>(kind, y.view(), t.view());
      y[i] = keep - eps;
      const double down = loss<double>(kind, y.view(), t.view());
      y[i] = keep;
      CHECK((up - down) / (2 * eps) == doctest::Approx(dy[i]).epsilon(1e-7));
    }
  }
  CHECK(parse_loss("fvu") == Loss::fvu);
  CHECK(error_of([] { parse_loss("l1"); }).find("'l1'") != std::string::npos);
}
