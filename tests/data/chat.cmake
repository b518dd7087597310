# Owner: chat templates. Golden renderings (tests/data/fixtures/chat, made by python3-jinja2)
# and error messages of the Jinja engine.
dpo_add_test(test_chat_template SOURCES ${CMAKE_SOURCE_DIR}/tests/data/test_chat_template.cpp
             DEPS dpo_chat_template GTest::gtest_main)
