// Fuzzes the safetensors reader (core/safetensors.h): the 8-byte header length, the
// JSON header (strict: UTF-8, duplicate keys, dtypes, shapes, data_offsets) and the
// mapping of every tensor. The input is the whole file.
// Checked: a file that opens hands out tensors whose bytes lie inside the file and
// whose size is numel * element size; every byte of every tensor is read (ASan/SIGBUS
// would catch a view past the mapping).
#include <torch/types.h>

#include "core/safetensors.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_scratch("model.safetensors", data, size);
  fuzz::expect_clean("SafetensorsFile", [&] {
    dpo::SafetensorsFile f(path);
    uint64_t total = 0;
    for (const std::string& name : f.names()) {
      if (!f.has(name)) fuzz::fail("names() lists " + name + " but has() denies it");
      torch::Tensor t = f.get(name);
      if (t.scalar_type() != f.dtype(name)) fuzz::fail(name + ": get() dtype differs from dtype()");
      if (t.sizes().vec() != f.shape(name)) fuzz::fail(name + ": get() shape differs from shape()");
      const int64_t nbytes = t.numel() * static_cast<int64_t>(t.element_size());
      if (nbytes != f.nbytes(name)) fuzz::fail(name + ": nbytes() differs from numel * element size");
      total += static_cast<uint64_t>(nbytes);
      if (total > size) fuzz::fail("tensors hold more bytes than the file");
      const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
      volatile uint8_t sink = 0;
      for (int64_t i = 0; i < nbytes; ++i) sink ^= p[i];
      (void)sink;
    }
    (void)f.metadata().size();
  });
  return 0;
}
