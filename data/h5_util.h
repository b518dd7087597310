// Internal to data/: thin helpers over the HDF5 C API used by preference_h5.cpp.
// H5_CHECK turns a negative HDF5 return into an exception carrying the call, the
// source file and line, and the deepest message of HDF5's error stack (HDF5's own
// automatic stack printing is switched off). H5Id owns one hid_t.
#pragma once
#include <hdf5.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace dpo {
namespace h5 {

/// An HDF5 call failed; what() names the call, the source line and HDF5's reason.
struct H5Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Switches off HDF5's automatic error printing (once per process).
void init();

/// Serializes HDF5 calls: the Debian build (and most cluster builds) of libhdf5 is
/// not thread-safe, and the trainer may read from a loader thread.
std::recursive_mutex& mutex();

/// The deepest description on HDF5's current error stack (then clears it).
std::string error_stack_message();

[[noreturn]] void throw_error(const char* call, const char* file, int line);

template <typename T>
inline T check(T ret, const char* call, const char* file, int line) {
  if (ret < 0) throw_error(call, file, line);
  return ret;
}

#define H5_CHECK(call) ::dpo::h5::check((call), #call, __FILE__, __LINE__)

/// Owns one hid_t; closes it with the function given at construction.
class H5Id {
 public:
  using Closer = herr_t (*)(hid_t);
  H5Id() = default;
  H5Id(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~H5Id() { reset(); }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  H5Id(H5Id&& o) noexcept : id_(o.id_), closer_(o.closer_) { o.id_ = -1; }
  H5Id& operator=(H5Id&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      closer_ = o.closer_;
      o.id_ = -1;
    }
    return *this;
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  /// Closes now; a close error is reported (unlike the destructor, which ignores it).
  void close() {
    if (id_ >= 0) {
      hid_t id = id_;
      id_ = -1;
      if (closer_(id) < 0) throw_error("H5?close", __FILE__, __LINE__);
    }
  }
  void reset() {
    if (id_ >= 0) closer_(id_);
    id_ = -1;
  }

 private:
  hid_t id_ = -1;
  Closer closer_ = nullptr;
};

// An owned id from a checked call: H5_OWN(H5Dopen2(...), H5Dclose).
#define H5_OWN(call, closer) ::dpo::h5::H5Id(H5_CHECK(call), closer)

bool link_exists(hid_t loc, const std::string& name);

// Attributes on an object (the root group for preference files).
bool attr_exists(hid_t obj, const std::string& name);
void write_attr_int(hid_t obj, const std::string& name, int64_t value);
void write_attr_string(hid_t obj, const std::string& name, const std::string& value);
void write_attr_strings(hid_t obj, const std::string& name, const std::vector<std::string>& values);
/// Throws std::runtime_error naming the attribute when it is missing or not an integer.
int64_t read_attr_int(hid_t obj, const std::string& name);
/// Reads a scalar string attribute (fixed or variable length).
std::string read_attr_string(hid_t obj, const std::string& name);
/// Reads a 1-D (or scalar) string attribute as a list.
std::vector<std::string> read_attr_strings(hid_t obj, const std::string& name);

/// A 1-D extendible chunked dataset (optionally shuffle + deflate) of `file_type`.
H5Id create_extendible_1d(hid_t loc, const std::string& name, hid_t file_type, int64_t chunk, int deflate_level);
/// A 1-D fixed-size chunked dataset of `n` elements (n may be 0).
H5Id create_fixed_1d(hid_t loc, const std::string& name, hid_t file_type, int64_t n, int64_t chunk, int deflate_level);

/// Number of elements of a 1-D dataset; throws if its rank is not 1.
int64_t length_1d(hid_t dset, const std::string& what);
/// Elements of a 1-D dataset that have storage in the file (chunked: allocated chunks x
/// chunk length; contiguous/compact: stored bytes / element size). Less than its length
/// means elements that were never written and would read as the fill value: a damaged
/// or forged file (a few KB claiming 2^33 offsets would make a reader allocate 64 GB).
int64_t stored_elements_1d(hid_t dset);
/// Appends n elements of `mem_type` to a 1-D extendible dataset whose current size is `cur`.
void append_1d(hid_t dset, hid_t mem_type, const void* data, int64_t cur, int64_t n);
/// Writes n elements at [start, start+n) of a 1-D dataset.
void write_1d(hid_t dset, hid_t mem_type, const void* data, int64_t start, int64_t n);
/// Reads n elements at [start, start+n) of a 1-D dataset into `out` (converted to mem_type).
void read_1d(hid_t dset, hid_t mem_type, void* out, int64_t start, int64_t n);

}  // namespace h5
}  // namespace dpo
