# Helpers every CMakeLists.txt in the tree uses: one way to add a library, a tool and
# a test (labels: unit = no MPI, mpi = through mpirun, e2e, slurm, cuda).
#
# One precompiled torch header for the whole build: dpo_torch_pch compiles
# cmake/pch_torch.h once and every TORCH target reuses it (REUSE_FROM), instead of
# each target paying ~40 s for its own copy. GCC takes a PCH only when the flags
# that shape code generation match, so TORCH targets share one flag set (the -D
# macros a target adds do not matter: the torch headers do not read them).

set(DPO_PCH_TORCH ${CMAKE_SOURCE_DIR}/cmake/pch_torch.h)
set(DPO_MPIEXEC ${MPIEXEC_EXECUTABLE})
set(DPO_MPIEXEC_FLAGS --allow-run-as-root --oversubscribe --bind-to none)
option(DPO_PCH "Use one shared precompiled libtorch header" ON)

function(_dpo_common target)
  target_include_directories(${target} PUBLIC ${CMAKE_SOURCE_DIR})
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter -Wno-sign-compare>)
  if(DPO_ASAN)
    target_compile_options(${target} PRIVATE -fsanitize=address -fno-omit-frame-pointer)
    target_link_options(${target} PUBLIC -fsanitize=address)
  endif()
endfunction()

# A precompiled-header target: cmake/pch_torch.h compiled once, with ARGN as extra
# compile options (the targets that reuse it must compile with the same ones).
function(_dpo_pch_target name)
  add_library(${name} STATIC ${CMAKE_SOURCE_DIR}/cmake/pch_anchor.cpp)
  _dpo_common(${name})
  target_link_libraries(${name} PUBLIC ${DPO_TORCH_LIBRARIES})
  if(ARGN)
    target_compile_options(${name} PRIVATE ${ARGN})
  endif()
  if(DPO_PCH)
    target_precompile_headers(${name} PRIVATE ${DPO_PCH_TORCH})
    if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
      # Without it clang stamps the PCH with the headers' mtimes and ccache cannot reuse it.
      target_compile_options(${name} PRIVATE "SHELL:-Xclang -fno-pch-timestamp")
    endif()
  endif()
endfunction()
_dpo_pch_target(dpo_torch_pch)

# clang: the test executables' own sources compile at -O1 (test code is not the hot
# path; the libraries they test stay -O2), with a copy of the PCH built at -O1 (clang
# takes ~25% longer on a file whose -O differs from its PCH's): test_training.cpp
# 14.0 s -> 12.3 s. GCC gains nothing at -O1 (docs/benchmarks.md), so it keeps one PCH.
set(DPO_TEST_PCH dpo_torch_pch)
set(DPO_TEST_OPTIONS "")
if(DPO_PCH AND DPO_BUILD_TESTS AND CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  set(DPO_TEST_OPTIONS -O1)
  _dpo_pch_target(dpo_test_pch ${DPO_TEST_OPTIONS})
  set(DPO_TEST_PCH dpo_test_pch)
endif()

# Links libtorch into `target` and lets it reuse a shared precompiled header
# (dpo_torch_pch, or the one named by a third argument).
# The PCH is built -fPIC (a library); executables would compile -fPIE, which GCC
# refuses to mix with it (-Winvalid-pch: the header is then parsed again, ~15 s a
# file), so their objects are compiled -fPIC too (they still link as PIE).
function(_dpo_torch target scope)
  set(_pch dpo_torch_pch)
  if(ARGC GREATER 2)
    set(_pch ${ARGV2})
  endif()
  target_link_libraries(${target} ${scope} ${DPO_TORCH_LIBRARIES})
  if(DPO_PCH)
    target_precompile_headers(${target} REUSE_FROM ${_pch})
    get_target_property(_type ${target} TYPE)
    if(_type STREQUAL "EXECUTABLE")
      set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE OFF)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fPIC>)
    endif()
  endif()
endfunction()

# dpo_add_library(name [TORCH] SOURCES a.cpp ... [DEPS lib ...])
# TORCH: links libtorch and uses the shared precompiled header.
function(dpo_add_library name)
  cmake_parse_arguments(A "TORCH" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${A_SOURCES})
  _dpo_common(${name})
  target_link_libraries(${name} PUBLIC ${A_DEPS})
  if(A_TORCH)
    _dpo_torch(${name} PUBLIC)
  endif()
endfunction()

# dpo_add_tool(name [TORCH] SOURCES main.cpp ... DEPS lib ...): an installed executable
# in build/bin (benchmarks use it too: they are built by default).
function(dpo_add_tool name)
  cmake_parse_arguments(A "TORCH" "" "SOURCES;DEPS" ${ARGN})
  add_executable(${name} ${A_SOURCES})
  _dpo_common(${name})
  target_link_libraries(${name} PRIVATE ${A_DEPS})
  if(A_TORCH)
    _dpo_torch(${name} PRIVATE)
  endif()
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
  install(TARGETS ${name} RUNTIME DESTINATION bin)
endfunction()

# dpo_add_test(name SOURCES t.cpp ... DEPS lib ... [TORCH] [LABEL unit|mpi|...] [NP n]
#              [TIMEOUT s] [ARGS ...])
# One GoogleTest executable in build/tests. Without NP: one ctest case <name> runs every
# TEST of it in one process (label unit by default; pick TESTs with
# `build/tests/<name> --gtest_filter=...`). With -DDPO_TEST_PER_CASE=ON each TEST is its own
# ctest case instead, listed when ctest runs (a process each: ~0.7 s of libtorch start-up per
# case, which made the suite 3x slower). With NP n: the whole executable runs under
# mpirun -np n as one case named <name>_np<n> (label mpi); call again with another
# NP to add more rank counts of the same executable.
function(dpo_add_test name)
  cmake_parse_arguments(A "TORCH" "LABEL;NP;TIMEOUT" "SOURCES;DEPS;ARGS" ${ARGN})
  if(NOT A_LABEL)
    set(A_LABEL unit)
  endif()
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 600)
  endif()
  if(NOT TARGET ${name})
    add_executable(${name} ${A_SOURCES})
    _dpo_common(${name})
    target_link_libraries(${name} PRIVATE ${A_DEPS} GTest::gtest Threads::Threads)
    if(A_TORCH)
      _dpo_torch(${name} PRIVATE ${DPO_TEST_PCH})
    endif()
    if(DPO_TEST_OPTIONS)
      target_compile_options(${name} PRIVATE ${DPO_TEST_OPTIONS})
    endif()
    set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  endif()
  if(A_NP)
    add_test(NAME ${name}_np${A_NP}
             COMMAND ${DPO_MPIEXEC} ${DPO_MPIEXEC_FLAGS} -np ${A_NP} $<TARGET_FILE:${name}> ${A_ARGS})
    set_tests_properties(${name}_np${A_NP} PROPERTIES LABELS mpi TIMEOUT ${A_TIMEOUT} RUN_SERIAL TRUE
      ENVIRONMENT "OMPI_MCA_rmaps_base_oversubscribe=1;OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1")
  elseif(DPO_TEST_PER_CASE)
    include(GoogleTest)
    gtest_discover_tests(${name} EXTRA_ARGS ${A_ARGS} PROPERTIES LABELS ${A_LABEL} TIMEOUT ${A_TIMEOUT}
                         DISCOVERY_TIMEOUT 300 DISCOVERY_MODE PRE_TEST)
  else()
    add_test(NAME ${name} COMMAND $<TARGET_FILE:${name}> ${A_ARGS})
    set_tests_properties(${name} PROPERTIES LABELS ${A_LABEL} TIMEOUT ${A_TIMEOUT})
  endif()
endfunction()
