# SPDX-License-Identifier: MIT
# `mxd train --aux-k` on a tiny teacher: a run resumed from its checkpoint (which carries the
# dead-unit state) ends with the same bytes as an uninterrupted one; metrics.json reports the
# AuxK settings; bad AuxK flags are refused naming the value.
file(REMOVE_RECURSE ${WORK_DIR})
set(tiny --d-in 8 --d-hidden 32 --d-out 8 --teacher-hidden 32 --k 4 --batch 32 --eval-rows 256
         --warmup 5 --lr 3e-3 --log-every 5 --threads 1 --aux-k 4 --dead-window 64)
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}\n${out}\n${err}")
  endif()
endfunction()
run(${MXD} train ${tiny} --steps 40 --out ${WORK_DIR}/straight)
run(${MXD} train ${tiny} --steps 20 --out ${WORK_DIR}/resumed)
run(${MXD} train ${tiny} --steps 40 --out ${WORK_DIR}/resumed --resume ${WORK_DIR}/resumed)
foreach(f mxd.safetensors topk_transcoder.safetensors mxd.dead.safetensors topk_transcoder.dead.safetensors)
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${WORK_DIR}/straight/${f} ${WORK_DIR}/resumed/${f}
                  RESULT_VARIABLE same)
  if(NOT same EQUAL 0)
    message(FATAL_ERROR "resumed ${f} differs from the uninterrupted run's")
  endif()
endforeach()
file(READ ${WORK_DIR}/straight/metrics.json metrics)
foreach(i 0 1)
  string(JSON k GET ${metrics} models ${i} aux_k)
  string(JSON d GET ${metrics} models ${i} train_dead_fraction)
  if(NOT k EQUAL 4 OR d LESS 0 OR d GREATER 1)
    message(FATAL_ERROR "metrics.json model ${i}: aux_k = ${k}, train_dead_fraction = ${d}")
  endif()
endforeach()
foreach(bad "--aux-k;-1;--aux-k = -1 must be >= 0" "--aux-k;2;--aux-coef;0;--aux-coef = 0 must be positive"
            "--aux-k;2;--dead-window;0;--dead-window = 0 must be positive"
            "--tc-recipe;authors;--dead-window;100;--aux-coef and --dead-window need --aux-k")
  list(POP_BACK bad expected)
  execute_process(COMMAND ${MXD} train ${bad} --out ${WORK_DIR}/bad RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(rc EQUAL 0 OR NOT err MATCHES "mxd: error: ${expected}")
    message(FATAL_ERROR "mxd train ${bad}: status ${rc}, expected the error '${expected}', got: ${err}")
  endif()
endforeach()
