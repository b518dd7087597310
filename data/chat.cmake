# Owner: chat templates. dpo_chat_template: the Jinja engine for Hugging Face chat
# templates (no libtorch, no sentencepiece: safe in any process).
dpo_add_library(dpo_chat_template
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/chat_template.cpp
  DEPS nlohmann_json::nlohmann_json)
