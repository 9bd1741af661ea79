// SPDX-License-Identifier: MIT
// The one translation unit that holds doctest's runner.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
