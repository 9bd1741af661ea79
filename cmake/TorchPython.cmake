# SPDX-License-Identifier: MIT
# MXD_TORCH_PYTHON: the Python that imports torch, for mxd_torch and the Python tests. Unless
# set by the user, the first of /usr/bin/python3 (where Debian's python3-torch installs) and
# python3 on PATH that imports torch; unset where there is none.
if(NOT MXD_TORCH_PYTHON)
  find_program(_mxd_path_python3 python3)
  foreach(py /usr/bin/python3 ${_mxd_path_python3})
    if(EXISTS ${py})
      execute_process(COMMAND ${py} -c "import torch" RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
      if(rc EQUAL 0)
        set(MXD_TORCH_PYTHON ${py} CACHE FILEPATH "A Python that imports torch (mxd_torch, Python tests)")
        break()
      endif()
    endif()
  endforeach()
  unset(_mxd_path_python3 CACHE)
endif()
