# Owner: gpu (issue 12). Checkpointed RNG state with a CPU stand-in for the CUDA generator.
dpo_add_test(test_rng_state TORCH SOURCES ${CMAKE_SOURCE_DIR}/tests/launch/test_rng_state.cpp
  DEPS dpo_rng_state dpo_safetensors GTest::gtest_main TIMEOUT 60)
