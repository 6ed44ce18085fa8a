#include "checkpoints/hdf5_util.h"

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"

namespace eellm::h5 {
namespace {

// Strings longer than this in a file are treated as corruption rather than allocated.
constexpr size_t kMaxStringBytes = size_t{1} << 30;

herr_t CollectError(unsigned /*n*/, const H5E_error2_t* err, void* data) {
  auto* out = static_cast<std::vector<std::string>*>(data);
  if (err != nullptr && err->desc != nullptr && err->desc[0] != '\0') out->push_back(err->desc);
  return 0;
}

// Attribute creation properties: UTF-8 attribute names (as h5py writes them).
Handle Utf8NamePlist() {
  Handle acpl = PlistHandle(H5Pcreate(H5P_ATTRIBUTE_CREATE));
  if (acpl.valid()) H5Pset_char_encoding(acpl.get(), H5T_CSET_UTF8);
  return acpl;
}

absl::Status WriteScalarAttr(hid_t loc, const std::string& name, hid_t file_type, hid_t mem_type,
                             const void* value) {
  Handle acpl = Utf8NamePlist();
  Handle space = SpaceHandle(H5Screate(H5S_SCALAR));
  if (!acpl.valid() || !space.valid()) {
    return Error(absl::StatusCode::kInternal, absl::StrCat("attribute '", name, "': setup"));
  }
  Handle attr =
      AttrHandle(H5Acreate2(loc, name.c_str(), file_type, space.get(), acpl.get(), H5P_DEFAULT));
  if (!attr.valid()) {
    return Error(absl::StatusCode::kInternal, absl::StrCat("cannot create attribute '", name, "'"));
  }
  if (H5Awrite(attr.get(), mem_type, value) < 0) {
    return Error(absl::StatusCode::kInternal, absl::StrCat("cannot write attribute '", name, "'"));
  }
  return absl::OkStatus();
}

// Opens attribute `name` and checks it holds exactly one element of type class `cls`.
absl::StatusOr<Handle> OpenScalarAttr(hid_t loc, const std::string& name, H5T_class_t cls,
                                      const char* expected) {
  if (!HasAttr(loc, name)) {
    return absl::NotFoundError(absl::StrCat("attribute '", name, "' is missing"));
  }
  Handle attr = AttrHandle(H5Aopen(loc, name.c_str(), H5P_DEFAULT));
  if (!attr.valid()) {
    return Error(absl::StatusCode::kDataLoss, absl::StrCat("cannot open attribute '", name, "'"));
  }
  Handle type = TypeHandle(H5Aget_type(attr.get()));
  Handle space = SpaceHandle(H5Aget_space(attr.get()));
  if (!type.valid() || !space.valid()) {
    return Error(absl::StatusCode::kDataLoss,
                 absl::StrCat("cannot read the type of attribute '", name, "'"));
  }
  if (H5Tget_class(type.get()) != cls) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attribute '", name, "' has type ", DescribeType(type.get()), ", expected ", expected));
  }
  if (H5Sget_simple_extent_npoints(space.get()) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("attribute '", name, "' is not a single ", expected));
  }
  return attr;
}

}  // namespace

ScopedErrorSilencer::ScopedErrorSilencer() {
  H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

ScopedErrorSilencer::~ScopedErrorSilencer() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }

std::string LastErrorDetail() {
  std::vector<std::string> messages;
  // Downward: from the API call to the function where the error was first detected.
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, CollectError, &messages);
  return messages.empty() ? std::string() : messages.back();
}

absl::Status Error(absl::StatusCode code, const std::string& message) {
  std::string detail = LastErrorDetail();
  if (detail.empty()) return absl::Status(code, message);
  return absl::Status(code, absl::StrCat(message, " (HDF5: ", detail, ")"));
}

absl::Status Annotate(const absl::Status& s, const std::string& prefix) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

std::string DescribeType(hid_t type) {
  const size_t bits = H5Tget_size(type) * 8;
  switch (H5Tget_class(type)) {
    case H5T_FLOAT:
      return absl::StrCat("f", bits);
    case H5T_INTEGER:
      return absl::StrCat(H5Tget_sign(type) == H5T_SGN_NONE ? "u" : "i", bits);
    case H5T_STRING:
      return "string";
    case H5T_COMPOUND:
      return "compound";
    case H5T_ARRAY:
      return "array";
    case H5T_ENUM:
      return "enum";
    case H5T_VLEN:
      return "vlen";
    case H5T_OPAQUE:
      return "opaque";
    case H5T_REFERENCE:
      return "reference";
    default:
      return "unknown type";
  }
}

absl::Status WriteStringAttr(hid_t loc, const std::string& name, const std::string& value) {
  if (value.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("attribute '", name, "': string values may not contain NUL bytes"));
  }
  // Fixed length (value plus its NUL) keeps the text inside checksummed metadata; a
  // variable-length string would live in the unchecksummed global heap, where a flipped byte
  // can make HDF5 1.10 loop forever.
  Handle type = TypeHandle(H5Tcopy(H5T_C_S1));
  if (!type.valid() || H5Tset_size(type.get(), value.size() + 1) < 0 ||
      H5Tset_strpad(type.get(), H5T_STR_NULLTERM) < 0 ||
      H5Tset_cset(type.get(), H5T_CSET_UTF8) < 0) {
    return Error(absl::StatusCode::kInternal, "cannot build the string type");
  }
  return WriteScalarAttr(loc, name, type.get(), type.get(), value.c_str());
}

absl::Status WriteInt64Attr(hid_t loc, const std::string& name, int64_t value) {
  return WriteScalarAttr(loc, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &value);
}

absl::Status WriteUint32Attr(hid_t loc, const std::string& name, uint32_t value) {
  return WriteScalarAttr(loc, name, H5T_STD_U32LE, H5T_NATIVE_UINT32, &value);
}

bool HasAttr(hid_t loc, const std::string& name) { return H5Aexists(loc, name.c_str()) > 0; }

absl::StatusOr<std::string> ReadStringAttr(hid_t loc, const std::string& name) {
  auto attr_or = OpenScalarAttr(loc, name, H5T_STRING, "string");
  if (!attr_or.ok()) return attr_or.status();
  Handle attr = std::move(attr_or).value();
  Handle file_type = TypeHandle(H5Aget_type(attr.get()));
  if (!file_type.valid()) {
    return Error(absl::StatusCode::kDataLoss, absl::StrCat("attribute '", name, "': no type"));
  }
  const htri_t variable = H5Tis_variable_str(file_type.get());
  if (variable < 0) {
    return Error(absl::StatusCode::kDataLoss, absl::StrCat("attribute '", name, "': bad type"));
  }
  if (variable > 0) {
    Handle mem_type = TypeHandle(H5Tcopy(H5T_C_S1));
    if (!mem_type.valid() || H5Tset_size(mem_type.get(), H5T_VARIABLE) < 0 ||
        H5Tset_cset(mem_type.get(), H5Tget_cset(file_type.get())) < 0) {
      return Error(absl::StatusCode::kInternal, "cannot build the string type");
    }
    char* data = nullptr;
    if (H5Aread(attr.get(), mem_type.get(), &data) < 0) {
      return Error(absl::StatusCode::kDataLoss, absl::StrCat("cannot read attribute '", name, "'"));
    }
    std::string value = data != nullptr ? std::string(data) : std::string();
    if (data != nullptr) H5free_memory(data);
    return value;
  }
  // Fixed-length string: read the raw bytes, then drop the padding.
  const size_t size = H5Tget_size(file_type.get());
  if (size == 0 || size > kMaxStringBytes) {
    return absl::DataLossError(
        absl::StrCat("attribute '", name, "' has an implausible size ", size));
  }
  std::vector<char> buf(size, '\0');
  if (H5Aread(attr.get(), file_type.get(), buf.data()) < 0) {
    return Error(absl::StatusCode::kDataLoss, absl::StrCat("cannot read attribute '", name, "'"));
  }
  std::string value(buf.data(), strnlen(buf.data(), size));
  if (H5Tget_strpad(file_type.get()) == H5T_STR_SPACEPAD) {
    value.erase(value.find_last_not_of(' ') + 1);
  }
  return value;
}

absl::StatusOr<int64_t> ReadIntAttr(hid_t loc, const std::string& name) {
  auto attr_or = OpenScalarAttr(loc, name, H5T_INTEGER, "integer");
  if (!attr_or.ok()) return attr_or.status();
  int64_t value = 0;
  if (H5Aread(attr_or->get(), H5T_NATIVE_INT64, &value) < 0) {
    return Error(absl::StatusCode::kDataLoss, absl::StrCat("cannot read attribute '", name, "'"));
  }
  return value;
}

absl::Status WriteInt64ArrayAttr(hid_t loc, const std::string& name,
                                 const std::vector<int64_t>& values) {
  const hsize_t n = values.size();
  Handle space = SpaceHandle(n == 0 ? H5Screate(H5S_NULL) : H5Screate_simple(1, &n, nullptr));
  if (!space.valid()) return Error(absl::StatusCode::kInternal, "cannot create a dataspace");
  Handle attr = AttrHandle(
      H5Acreate2(loc, name.c_str(), H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT));
  if (!attr.valid()) {
    return Error(absl::StatusCode::kInternal, absl::StrCat("cannot create attribute '", name, "'"));
  }
  if (n > 0 && H5Awrite(attr.get(), H5T_NATIVE_INT64, values.data()) < 0) {
    return Error(absl::StatusCode::kInternal, absl::StrCat("cannot write attribute '", name, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> ReadInt64ArrayAttr(hid_t loc, const std::string& name) {
  if (H5Aexists(loc, name.c_str()) <= 0) {
    return absl::NotFoundError(absl::StrCat("attribute '", name, "' not found"));
  }
  Handle attr = AttrHandle(H5Aopen(loc, name.c_str(), H5P_DEFAULT));
  Handle type = TypeHandle(attr.valid() ? H5Aget_type(attr.get()) : H5I_INVALID_HID);
  Handle space = SpaceHandle(attr.valid() ? H5Aget_space(attr.get()) : H5I_INVALID_HID);
  if (!attr.valid() || !type.valid() || !space.valid()) {
    return Error(absl::StatusCode::kDataLoss, absl::StrCat("cannot open attribute '", name, "'"));
  }
  if (H5Tget_class(type.get()) != H5T_INTEGER) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attribute '", name, "' has type ", DescribeType(type.get()), ", expected integers"));
  }
  const H5S_class_t cls = H5Sget_simple_extent_type(space.get());
  if (cls == H5S_NULL) return std::vector<int64_t>();
  const hssize_t n = H5Sget_simple_extent_npoints(space.get());
  if (cls != H5S_SIMPLE || H5Sget_simple_extent_ndims(space.get()) != 1 || n < 0 ||
      n > H5S_MAX_RANK) {
    return absl::DataLossError(absl::StrCat("attribute '", name, "' is not a list of at most ",
                                            H5S_MAX_RANK, " integers"));
  }
  std::vector<int64_t> values(static_cast<size_t>(n));
  if (n > 0 && H5Aread(attr.get(), H5T_NATIVE_INT64, values.data()) < 0) {
    return Error(absl::StatusCode::kDataLoss, absl::StrCat("cannot read attribute '", name, "'"));
  }
  return values;
}

}  // namespace eellm::h5
