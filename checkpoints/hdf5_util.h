// Small helpers over the HDF5 C API for the checkpoint formats: an RAII handle so every hid_t
// is closed on every path, a scoped silencer for HDF5's automatic error-stack printing, capture
// of the innermost HDF5 error message into absl statuses, and typed scalar attributes
// (UTF-8 strings and integers) that h5py reads.
//
// The HDF5 library (Debian's serial build) is not thread-safe: callers must not use these
// helpers, or the checkpoint functions built on them, from several threads at once.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace eellm::h5 {

// Owns one HDF5 identifier and closes it with the matching H5?close function. Move-only.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~Handle() { Close(); }
  Handle(Handle&& o) noexcept { *this = std::move(o); }
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      Close();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
      closer_ = o.closer_;
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  bool valid() const { return id_ >= 0; }
  hid_t get() const { return id_; }
  // Closes now; returns false if HDF5 reported an error (e.g. a failed flush on H5Fclose).
  bool Close() {
    if (id_ < 0) return true;
    herr_t r = closer_(id_);
    id_ = H5I_INVALID_HID;
    return r >= 0;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

inline Handle FileHandle(hid_t id) { return Handle(id, H5Fclose); }
inline Handle GroupHandle(hid_t id) { return Handle(id, H5Gclose); }
inline Handle DatasetHandle(hid_t id) { return Handle(id, H5Dclose); }
inline Handle AttrHandle(hid_t id) { return Handle(id, H5Aclose); }
inline Handle SpaceHandle(hid_t id) { return Handle(id, H5Sclose); }
inline Handle TypeHandle(hid_t id) { return Handle(id, H5Tclose); }
inline Handle PlistHandle(hid_t id) { return Handle(id, H5Pclose); }

// Turns off HDF5's automatic printing of error stacks for its lifetime (restores on exit).
class ScopedErrorSilencer {
 public:
  ScopedErrorSilencer();
  ~ScopedErrorSilencer();
  ScopedErrorSilencer(const ScopedErrorSilencer&) = delete;
  ScopedErrorSilencer& operator=(const ScopedErrorSilencer&) = delete;

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

// The innermost (most specific) message on HDF5's current error stack, or "" when empty.
// Call right after the failing HDF5 call: the next API call clears the stack.
std::string LastErrorDetail();

// A status with `message`, plus " (HDF5: <innermost error>)" when HDF5 recorded one.
absl::Status Error(absl::StatusCode code, const std::string& message);

// Same code as `s`, message prefixed with `prefix`.
absl::Status Annotate(const absl::Status& s, const std::string& prefix);

// A readable name for an HDF5 datatype: "f32", "f64", "i32", "u8", "string", ...
std::string DescribeType(hid_t type);

// Scalar attributes on a file, group or dataset. Strings are written as fixed-length,
// NUL-terminated UTF-8 (kept in the checksummed object header); reading also accepts
// variable-length strings. Integers are written little-endian.
absl::Status WriteStringAttr(hid_t loc, const std::string& name, const std::string& value);
absl::Status WriteInt64Attr(hid_t loc, const std::string& name, int64_t value);
absl::Status WriteUint32Attr(hid_t loc, const std::string& name, uint32_t value);
bool HasAttr(hid_t loc, const std::string& name);
absl::StatusOr<std::string> ReadStringAttr(hid_t loc, const std::string& name);
// Any integer attribute, converted to int64 (NotFound when absent).
absl::StatusOr<int64_t> ReadIntAttr(hid_t loc, const std::string& name);
// One-dimensional int64 array attributes (shapes, positions); reading accepts any integer type
// and at most H5S_MAX_RANK elements.
absl::Status WriteInt64ArrayAttr(hid_t loc, const std::string& name,
                                 const std::vector<int64_t>& values);
absl::StatusOr<std::vector<int64_t>> ReadInt64ArrayAttr(hid_t loc, const std::string& name);

}  // namespace eellm::h5
