# SPDX-License-Identifier: MIT
# `mxd eval LAYER OUT --batch BATCH`: the gelu_glu case split into its layer and its batch
# (x, dy, target) gives the golden outputs (relative error 1e-10 in f64), and the layer file
# alone is an error that names the missing batch.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(layer ${GOLDEN}/split/gelu_glu_layer.safetensors)
execute_process(COMMAND ${MXD} eval ${layer} ${WORK_DIR}/out.safetensors
                        --batch ${GOLDEN}/split/gelu_glu_batch.safetensors
                RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mxd eval --batch failed (${rc}): ${err}")
endif()
execute_process(COMMAND ${COMPARE} ${WORK_DIR}/out.safetensors ${GOLDEN}/gelu_glu.safetensors 1e-10
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mxd eval --batch output differs from gelu_glu")
endif()
execute_process(COMMAND ${MXD} eval ${layer} ${WORK_DIR}/never.safetensors
                RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 1 OR NOT err MATCHES "has no batch x .*--batch")
  message(FATAL_ERROR "mxd eval on a layer without x: exit ${rc}, '${err}'")
endif()
