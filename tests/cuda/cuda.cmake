# Owner: gpu (issue 12). Tests that need a CUDA device (label cuda): without one they print
# NOT RUN and exit 77, which ctest reports as not run (SKIP_RETURN_CODE), never as passed.
# No CUDA headers: they build against any libtorch. The GPU check (scripts/gpu/check.sh)
# runs them with their numbers; bench_cuda_step is its 7B/8B benchmark (a tool).
add_executable(test_cuda ${CMAKE_SOURCE_DIR}/tests/cuda/test_cuda.cpp)
_dpo_common(test_cuda)
target_link_libraries(test_cuda PRIVATE dpo_llama dpo_lora dpo_objective dpo_nf4 dpo_rng_state GTest::gtest
                      Threads::Threads ${TORCH_LIBRARIES})
target_precompile_headers(test_cuda PRIVATE ${DPO_PCH_TORCH})
set_target_properties(test_cuda PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
add_test(NAME test_cuda COMMAND test_cuda)
set_tests_properties(test_cuda PROPERTIES LABELS cuda SKIP_RETURN_CODE 77 TIMEOUT 600)

dpo_add_tool(bench_cuda_step TORCH SOURCES ${CMAKE_SOURCE_DIR}/tests/bench/bench_cuda_step.cpp
             DEPS dpo_llama dpo_lora dpo_objective dpo_cli)
