# -DDPO_FUZZ=ON: the libFuzzer build (scripts/fuzz.sh configures it in build-fuzz).
# Needs clang (clang-14 + libfuzzer-14-dev: `DPO_WITH_FUZZ=1 scripts/setup.sh`).
# Every library is compiled with coverage instrumentation for libFuzzer plus
# AddressSanitizer and UndefinedBehaviorSanitizer (a UB report aborts like a crash);
# tests/fuzz/fuzz.cmake links the harnesses with -fsanitize=fuzzer. libtorch,
# libhdf5, Boost and sentencepiece stay the Debian (uninstrumented) libraries.
if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  message(FATAL_ERROR "DPO_FUZZ needs clang (libFuzzer): configure with -DCMAKE_CXX_COMPILER=clang++-14 "
                      "-DCMAKE_C_COMPILER=clang-14, or run scripts/fuzz.sh")
endif()
set(DPO_SANITIZE -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
add_compile_options(-fsanitize=fuzzer-no-link ${DPO_SANITIZE} -g)
add_link_options(${DPO_SANITIZE})
