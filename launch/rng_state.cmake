# Owner: gpu (issue 12). Every rank's CPU and CUDA generator states in checkpoints
# (launch/rng_state.h); linked into dpo_train.
dpo_add_library(dpo_rng_state TORCH SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/rng_state.cpp DEPS dpo_safetensors)
target_link_libraries(dpo_train PUBLIC dpo_rng_state)
