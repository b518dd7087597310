#include "data/h5_util.h"

#include <cstdint>
#include <cstring>

namespace dpo {
namespace h5 {

void init() {
  static std::once_flag once;
  std::call_once(once, [] {
    // No HDF5 clean-up at exit: after a failed H5Fclose (disk full) libhdf5 1.10 crashes
    // in its atexit handler (H5F__close_cb), turning a clean error into a segfault. Every
    // file is closed explicitly; the tools exit after reporting. (Must precede the first
    // HDF5 call; if the library is already up, this is a harmless no-op error.)
    H5dont_atexit();
    // Errors become exceptions with our own message; the default handler would print
    // the whole stack to stderr for every expected failure (e.g. a probe).
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  });
}

std::recursive_mutex& mutex() {
  static std::recursive_mutex m;
  return m;
}

namespace {
herr_t walk_cb(unsigned n, const H5E_error2_t* err, void* data) {
  auto* out = static_cast<std::vector<std::string>*>(data);
  std::string s = err->func_name ? err->func_name : "";
  std::string desc = err->desc ? err->desc : "";
  // The POSIX driver's write/read failures carry a long record (time, filename, buffer,
  // sizes) with the system's reason inside: keep "<reason> (file <name>)".
  auto field = [&](const char* key) -> std::string {
    const size_t b = desc.find(key);
    if (b == std::string::npos) return "";
    const size_t v = b + std::strlen(key), e = desc.find('\'', v);
    return e == std::string::npos ? "" : desc.substr(v, e - v);
  };
  const std::string reason = field("error message = '");
  if (!reason.empty()) {
    const std::string file = field("filename = '");
    desc = reason + (file.empty() ? "" : " (file " + file + ")");
  }
  for (char& c : desc)
    if (c == '\n' || c == '\r') c = ' ';  // one-line messages (ctime() ends with a newline)
  if (!desc.empty()) s += std::string(s.empty() ? "" : ": ") + desc;
  out->push_back(s);
  return 0;
}
}  // namespace

std::string error_stack_message() {
  std::vector<std::string> msgs;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk_cb, &msgs);
  H5Eclear2(H5E_DEFAULT);
  if (msgs.empty()) return "no HDF5 error message";
  // The top entry names the API call, the deepest one says what actually went wrong.
  if (msgs.size() == 1) return msgs.front();
  return msgs.back() + " (in " + msgs.front() + ")";
}

void throw_error(const char* call, const char* file, int line) {
  std::string call_s = call;
  auto paren = call_s.find('(');
  if (paren != std::string::npos) call_s = call_s.substr(0, paren);
  const char* base = std::strrchr(file, '/');
  throw H5Error(call_s + " failed [" + (base ? base + 1 : file) + ":" + std::to_string(line) +
                "]: " + error_stack_message());
}

bool link_exists(hid_t loc, const std::string& name) {
  // H5Lexists on "a/b" fails when "a" is missing; check each component.
  std::string path;
  size_t start = 0;
  while (start <= name.size()) {
    size_t slash = name.find('/', start);
    std::string part = name.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (!part.empty()) {
      path += (path.empty() ? "" : "/") + part;
      htri_t e = H5Lexists(loc, path.c_str(), H5P_DEFAULT);
      if (e <= 0) {
        H5Eclear2(H5E_DEFAULT);
        return false;
      }
    }
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return true;
}

bool attr_exists(hid_t obj, const std::string& name) {
  htri_t e = H5Aexists(obj, name.c_str());
  if (e < 0) throw_error("H5Aexists", __FILE__, __LINE__);
  return e > 0;
}

static void delete_attr_if_exists(hid_t obj, const std::string& name) {
  if (attr_exists(obj, name)) H5_CHECK(H5Adelete(obj, name.c_str()));
}

void write_attr_int(hid_t obj, const std::string& name, int64_t value) {
  delete_attr_if_exists(obj, name);
  H5Id space = H5_OWN(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id attr = H5_OWN(H5Acreate2(obj, name.c_str(), H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  H5_CHECK(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value));
}

static H5Id vlen_utf8_type() {
  H5Id t = H5_OWN(H5Tcopy(H5T_C_S1), H5Tclose);
  H5_CHECK(H5Tset_size(t.get(), H5T_VARIABLE));
  H5_CHECK(H5Tset_cset(t.get(), H5T_CSET_UTF8));
  return t;
}

void write_attr_string(hid_t obj, const std::string& name, const std::string& value) {
  delete_attr_if_exists(obj, name);
  H5Id type = vlen_utf8_type();
  H5Id space = H5_OWN(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id attr = H5_OWN(H5Acreate2(obj, name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  const char* p = value.c_str();
  H5_CHECK(H5Awrite(attr.get(), type.get(), &p));
}

void write_attr_strings(hid_t obj, const std::string& name, const std::vector<std::string>& values) {
  delete_attr_if_exists(obj, name);
  H5Id type = vlen_utf8_type();
  hsize_t n = values.size();
  H5Id space = H5_OWN(H5Screate_simple(1, &n, nullptr), H5Sclose);
  H5Id attr = H5_OWN(H5Acreate2(obj, name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  std::vector<const char*> ptrs;
  for (const auto& v : values) ptrs.push_back(v.c_str());
  if (n > 0) H5_CHECK(H5Awrite(attr.get(), type.get(), ptrs.data()));
}

static H5Id open_attr(hid_t obj, const std::string& name) {
  if (!attr_exists(obj, name)) throw std::runtime_error("missing attribute '" + name + "'");
  return H5_OWN(H5Aopen(obj, name.c_str(), H5P_DEFAULT), H5Aclose);
}

static int64_t attr_num_elements(hid_t attr) {
  H5Id space = H5_OWN(H5Aget_space(attr), H5Sclose);
  hssize_t n = H5Sget_simple_extent_npoints(space.get());
  if (n < 0) throw_error("H5Sget_simple_extent_npoints", __FILE__, __LINE__);
  return n;
}

int64_t read_attr_int(hid_t obj, const std::string& name) {
  H5Id attr = open_attr(obj, name);
  H5Id type = H5_OWN(H5Aget_type(attr.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_INTEGER)
    throw std::runtime_error("attribute '" + name + "' is not an integer");
  if (attr_num_elements(attr.get()) != 1)
    throw std::runtime_error("attribute '" + name + "' is not a single value");
  int64_t v = 0;
  H5_CHECK(H5Aread(attr.get(), H5T_NATIVE_INT64, &v));
  return v;
}

static std::vector<std::string> read_strings(hid_t attr, const std::string& name) {
  H5Id type = H5_OWN(H5Aget_type(attr), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_STRING) throw std::runtime_error("attribute '" + name + "' is not a string");
  const int64_t n = attr_num_elements(attr);
  std::vector<std::string> out;
  if (n == 0) return out;
  htri_t vlen = H5Tis_variable_str(type.get());
  if (vlen < 0) throw_error("H5Tis_variable_str", __FILE__, __LINE__);
  if (vlen) {
    H5Id mem = vlen_utf8_type();
    // Read with the file's character set to avoid a conversion error on ASCII files.
    H5_CHECK(H5Tset_cset(mem.get(), H5Tget_cset(type.get())));
    std::vector<char*> ptrs(n, nullptr);
    H5_CHECK(H5Aread(attr, mem.get(), ptrs.data()));
    for (char* p : ptrs) {
      out.emplace_back(p ? p : "");
      if (p) H5free_memory(p);
    }
  } else {
    size_t size = H5Tget_size(type.get());
    std::vector<char> buf(size * n + 1, 0);
    H5_CHECK(H5Aread(attr, type.get(), buf.data()));
    for (int64_t i = 0; i < n; ++i) {
      const char* p = buf.data() + i * size;
      out.emplace_back(p, strnlen(p, size));
    }
  }
  return out;
}

std::string read_attr_string(hid_t obj, const std::string& name) {
  H5Id attr = open_attr(obj, name);
  auto v = read_strings(attr.get(), name);
  if (v.size() != 1) throw std::runtime_error("attribute '" + name + "' is not a single string");
  return v[0];
}

std::vector<std::string> read_attr_strings(hid_t obj, const std::string& name) {
  H5Id attr = open_attr(obj, name);
  return read_strings(attr.get(), name);
}

static H5Id chunked_dcpl(int64_t chunk, int deflate_level) {
  H5Id dcpl = H5_OWN(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  hsize_t c = chunk;
  H5_CHECK(H5Pset_chunk(dcpl.get(), 1, &c));
  if (deflate_level > 0) {
    // Byte shuffle first: token ids < 2^16 leave two zero bytes per int32 that deflate
    // then removes almost for free.
    H5_CHECK(H5Pset_shuffle(dcpl.get()));
    H5_CHECK(H5Pset_deflate(dcpl.get(), deflate_level));
  }
  return dcpl;
}

H5Id create_extendible_1d(hid_t loc, const std::string& name, hid_t file_type, int64_t chunk, int deflate_level) {
  hsize_t cur = 0, max = H5S_UNLIMITED;
  H5Id space = H5_OWN(H5Screate_simple(1, &cur, &max), H5Sclose);
  H5Id dcpl = chunked_dcpl(chunk, deflate_level);
  return H5_OWN(H5Dcreate2(loc, name.c_str(), file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT), H5Dclose);
}

H5Id create_fixed_1d(hid_t loc, const std::string& name, hid_t file_type, int64_t n, int64_t chunk, int deflate_level) {
  hsize_t cur = n, max = H5S_UNLIMITED;
  H5Id space = H5_OWN(H5Screate_simple(1, &cur, &max), H5Sclose);
  H5Id dcpl = chunked_dcpl(chunk, deflate_level);
  return H5_OWN(H5Dcreate2(loc, name.c_str(), file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT), H5Dclose);
}

int64_t length_1d(hid_t dset, const std::string& what) {
  H5Id space = H5_OWN(H5Dget_space(dset), H5Sclose);
  int rank = H5_CHECK(H5Sget_simple_extent_ndims(space.get()));
  if (rank != 1) throw std::runtime_error(what + " has rank " + std::to_string(rank) + ", expected 1");
  hsize_t n = 0;
  H5_CHECK(H5Sget_simple_extent_dims(space.get(), &n, nullptr));
  return static_cast<int64_t>(n);
}

int64_t stored_elements_1d(hid_t dset) {
  H5Id dcpl = H5_OWN(H5Dget_create_plist(dset), H5Pclose);
  H5Id type = H5_OWN(H5Dget_type(dset), H5Tclose);
  const size_t esize = H5Tget_size(type.get());
  if (esize == 0) throw std::runtime_error("dataset with an element size of 0");
  if (H5Pget_layout(dcpl.get()) == H5D_CHUNKED) {
    hsize_t chunk = 0;
    if (H5Pget_chunk(dcpl.get(), 1, &chunk) != 1) throw std::runtime_error("chunked dataset of rank != 1");
    H5Id space = H5_OWN(H5Dget_space(dset), H5Sclose);
    hsize_t nchunks = 0;
    H5_CHECK(H5Dget_num_chunks(dset, space.get(), &nchunks));
    // Saturate: the product only has to be compared with a length.
    if (chunk != 0 && nchunks > static_cast<hsize_t>(INT64_MAX) / chunk) return INT64_MAX;
    return static_cast<int64_t>(nchunks * chunk);
  }
  return static_cast<int64_t>(H5Dget_storage_size(dset) / esize);
}

void append_1d(hid_t dset, hid_t mem_type, const void* data, int64_t cur, int64_t n) {
  if (n == 0) return;
  hsize_t new_size = cur + n;
  H5_CHECK(H5Dset_extent(dset, &new_size));
  write_1d(dset, mem_type, data, cur, n);
}

void write_1d(hid_t dset, hid_t mem_type, const void* data, int64_t start, int64_t n) {
  if (n == 0) return;
  H5Id fspace = H5_OWN(H5Dget_space(dset), H5Sclose);
  hsize_t s = start, c = n;
  H5_CHECK(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &s, nullptr, &c, nullptr));
  H5Id mspace = H5_OWN(H5Screate_simple(1, &c, nullptr), H5Sclose);
  H5_CHECK(H5Dwrite(dset, mem_type, mspace.get(), fspace.get(), H5P_DEFAULT, data));
}

void read_1d(hid_t dset, hid_t mem_type, void* out, int64_t start, int64_t n) {
  if (n == 0) return;
  H5Id fspace = H5_OWN(H5Dget_space(dset), H5Sclose);
  hsize_t s = start, c = n;
  H5_CHECK(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &s, nullptr, &c, nullptr));
  H5Id mspace = H5_OWN(H5Screate_simple(1, &c, nullptr), H5Sclose);
  H5_CHECK(H5Dread(dset, mem_type, mspace.get(), fspace.get(), H5P_DEFAULT, out));
}

}  // namespace h5
}  // namespace dpo
