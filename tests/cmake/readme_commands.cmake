# SPDX-License-Identifier: MIT
# README.md's set-up section holds exactly two commands, and they are the ones that are run:
# the first installs, builds and runs the mxd tool's default job; the second, the tests, is
# .ci/run's command character for character (CI runs that file, users read README).
#   cmake -DSRC=<repository root> -P tests/cmake/readme_commands.cmake
file(READ ${SRC}/README.md readme)
string(FIND "${readme}" "\n## Set up" start)
if(start EQUAL -1)
  message(FATAL_ERROR "README.md has no '## Set up' section")
endif()
string(SUBSTRING "${readme}" ${start} -1 section)
string(SUBSTRING "${section}" 1 -1 rest)
string(FIND "${rest}" "\n## " end)
string(SUBSTRING "${section}" 0 ${end} section)
# Indented lines are commands (Markdown code), one each.
string(REGEX MATCHALL "\n    [^\n]+" commands "${section}")
list(LENGTH commands n)
if(NOT n EQUAL 2)
  message(FATAL_ERROR "README.md's set-up section has ${n} commands, not 2:\n${commands}")
endif()
list(GET commands 0 main_job)
list(GET commands 1 tests)
string(REGEX REPLACE "^\n    " "" main_job "${main_job}")
string(REGEX REPLACE "^\n    " "" tests "${tests}")
if(NOT main_job MATCHES "^apt-get update && .* && \\./build/examples/mxd$")
  message(FATAL_ERROR "README's first command does not install and end by running the tool's "
                      "default job (./build/examples/mxd):\n${main_job}")
endif()
file(STRINGS ${SRC}/.ci/run ci REGEX "^apt-get update")
list(LENGTH ci n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR ".ci/run has ${n} command lines starting 'apt-get update', not 1")
endif()
if(NOT ci STREQUAL tests)
  message(FATAL_ERROR "README's test command and .ci/run's differ:\n"
                      "README:  ${tests}\n.ci/run: ${ci}")
endif()
message(STATUS "README's two set-up commands: the main job, and .ci/run's test command")
