# SPDX-License-Identifier: MIT
# README's two set-up commands may run in either order in one tree: the first configures build/
# before OpenMPI is installed. Configures a scratch tree with MPI hidden, then again with it
# visible, and requires the second configure to use MPI (the tree's outcome must not depend on
# what configured it before). -DSRC=<repo> -DWORK=<scratch dir>
file(REMOVE_RECURSE ${WORK})
set(flags -DMXD_BUILD_TESTS=OFF -DMXD_BUILD_EXAMPLES=OFF -DMXD_BUILD_BENCH=OFF -DMXD_TORCH=OFF
          -DMXD_INSTALL=OFF -DMXD_FUZZ=OFF)
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SRC} -B ${WORK} ${flags}
                        -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON
                OUTPUT_VARIABLE first ERROR_VARIABLE first RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR NOT first MATCHES "mxd: MPI not found")
  message(FATAL_ERROR "the first configure (MPI hidden) should succeed without MPI:\n${first}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SRC} -B ${WORK} -UCMAKE_DISABLE_FIND_PACKAGE_MPI
                OUTPUT_VARIABLE second ERROR_VARIABLE second RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR NOT second MATCHES "mxd: MPI [0-9]")
  message(FATAL_ERROR "the second configure (MPI visible) did not use MPI:\n${second}")
endif()
message(STATUS "MPI found on reconfigure after a first configure without it")
