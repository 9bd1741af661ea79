# SPDX-License-Identifier: MIT
# ctest's fuzz_smoke: where clang is installed but does not compile the project (the default
# g++ build), a nested clang build of tests/fuzz runs each harness for SECONDS seconds.
#   cmake -DSRC=<project> -DWORK=<dir> -DCLANGXX=<clang++> -DSECONDS=<s> -P smoke.cmake
file(MAKE_DIRECTORY ${WORK})
# libFuzzer's runtime comes apart from clang on some systems: without it, skip (not fail).
file(WRITE ${WORK}/probe.cpp
     "#include <cstddef>\n#include <cstdint>\n"
     "extern \"C\" int LLVMFuzzerTestOneInput(const std::uint8_t*, std::size_t) { return 0; }\n")
execute_process(COMMAND ${CLANGXX} -fsanitize=fuzzer,address,undefined ${WORK}/probe.cpp
                        -o ${WORK}/probe
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
if(NOT rc EQUAL 0)
  message("fuzz_smoke skipped: ${CLANGXX} cannot link -fsanitize=fuzzer (libFuzzer runtime missing)")
  return()
endif()
foreach(step
    "${CMAKE_COMMAND};-S;${SRC};-B;${WORK}/build;-DCMAKE_BUILD_TYPE=Release;-DCMAKE_CXX_COMPILER=${CLANGXX};-DMXD_FUZZ=ON;-DMXD_FUZZ_SECONDS=${SECONDS};-DMXD_BUILD_TESTS=OFF;-DMXD_BUILD_EXAMPLES=OFF;-DMXD_BUILD_BENCH=OFF;-DMXD_INSTALL=OFF;-DMXD_TORCH=OFF;-DMXD_CUDA=OFF"
    "${CMAKE_COMMAND};--build;${WORK}/build;-j2"
    "${CMAKE_CTEST_COMMAND};--test-dir;${WORK}/build;-L;fuzz;--output-on-failure")
  execute_process(COMMAND ${step} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "fuzz_smoke: '${step}' failed (${rc}):\n${out}")
  endif()
endforeach()
message("${out}")
