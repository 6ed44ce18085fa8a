#include "checkpoints/hdf5_checkpoint.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoints/hdf5_util.h"
#include "engine/core/status.h"

// Checksums are taken over the host copy, which must be the little-endian bytes of the file.
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "hdf5_checkpoint assumes a little-endian host"
#endif

namespace eellm {
namespace {

using h5::Handle;

constexpr char kFormat[] = "eellm-hdf5";
constexpr int64_t kFormatVersion = 1;
constexpr char kModelGroup[] = "/model";
constexpr char kAdamMGroup[] = "/optimizer/m";
constexpr char kAdamVGroup[] = "/optimizer/v";
constexpr char kAttrsGroup[] = "/attrs";
constexpr char kCrcAttr[] = "crc32";

std::string Where(const std::string& path) { return absl::StrCat("checkpoint ", path, ": "); }

uint32_t Crc32(const float* data, size_t n) {
  const auto* bytes = reinterpret_cast<const Bytef*>(data);
  size_t left = n * sizeof(float);
  uLong crc = crc32(0L, Z_NULL, 0);
  while (left > 0) {
    const uInt chunk = static_cast<uInt>(std::min<size_t>(left, size_t{1} << 30));
    crc = crc32(crc, bytes, chunk);
    bytes += chunk;
    left -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

// "tensor 'x'" for model tensors, "tensor 'x' in /optimizer/m" for optimizer state.
std::string TensorLabel(const std::string& name, const char* group) {
  if (std::strcmp(group, kModelGroup) == 0) return absl::StrCat("tensor '", name, "'");
  return absl::StrCat("tensor '", name, "' in ", group);
}

absl::Status ValidateParam(const ParamInfo& p) {
  if (p.name.empty() || p.name == "." || p.name.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "parameter name '", p.name, "' cannot be an HDF5 dataset name (empty, '.' or has '/')"));
  }
  for (int64_t d : p.shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "parameter '", p.name, "' has a negative dimension in shape ", ShapeToString(p.shape)));
    }
  }
  return absl::OkStatus();
}

// True if every component of the relative `path` ("optimizer/m") exists below `loc`.
bool PathExists(hid_t loc, const std::string& path) {
  for (size_t pos = 0; pos != std::string::npos;) {
    pos = path.find('/', pos + 1);
    if (H5Lexists(loc, path.substr(0, pos).c_str(), H5P_DEFAULT) <= 0) return false;
  }
  return true;
}

absl::StatusOr<Shape> ReadShape(hid_t dataset) {
  Handle space = h5::SpaceHandle(H5Dget_space(dataset));
  if (!space.valid()) return h5::Error(absl::StatusCode::kDataLoss, "cannot read its dataspace");
  const H5S_class_t cls = H5Sget_simple_extent_type(space.get());
  if (cls != H5S_SCALAR && cls != H5S_SIMPLE) {
    return absl::InvalidArgumentError("has a null or unknown dataspace");
  }
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 0 || rank > H5S_MAX_RANK) {
    return h5::Error(absl::StatusCode::kDataLoss, "has an unreadable rank");
  }
  std::vector<hsize_t> dims(rank);
  if (rank > 0 && H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr) < 0) {
    return h5::Error(absl::StatusCode::kDataLoss, "has unreadable dimensions");
  }
  return Shape(dims.begin(), dims.end());
}

// ---- saving ---------------------------------------------------------------------------------

// Link creation properties: UTF-8 names (as h5py writes), intermediate groups created.
Handle LinkPlist() {
  Handle lcpl = h5::PlistHandle(H5Pcreate(H5P_LINK_CREATE));
  if (lcpl.valid()) {
    H5Pset_char_encoding(lcpl.get(), H5T_CSET_UTF8);
    H5Pset_create_intermediate_group(lcpl.get(), 1);
  }
  return lcpl;
}

// Creates group `group_path` and one dataset per parameter from the device `arena`.
absl::Status WriteTensors(hid_t file, const char* group_path, const ParamStore& params,
                          const float* arena, std::vector<float>& host) {
  Handle lcpl = LinkPlist();
  Handle gcpl = h5::PlistHandle(H5Pcreate(H5P_GROUP_CREATE));
  Handle dcpl = h5::PlistHandle(H5Pcreate(H5P_DATASET_CREATE));
  if (!lcpl.valid() || !gcpl.valid() || !dcpl.valid() ||
      H5Pset_link_creation_order(gcpl.get(), H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED) < 0 ||
      H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER) < 0) {
    return h5::Error(absl::StatusCode::kInternal, "cannot set up HDF5 property lists");
  }
  Handle group = h5::GroupHandle(H5Gcreate2(file, group_path, lcpl.get(), gcpl.get(), H5P_DEFAULT));
  if (!group.valid()) {
    return h5::Error(absl::StatusCode::kInternal, absl::StrCat("cannot create ", group_path));
  }
  for (const ParamInfo& p : params.params()) {
    const std::string label = TensorLabel(p.name, group_path);
    std::vector<hsize_t> dims(p.shape.begin(), p.shape.end());
    Handle space = h5::SpaceHandle(
        dims.empty() ? H5Screate(H5S_SCALAR)
                     : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr));
    Handle ds = h5::DatasetHandle(H5Dcreate2(group.get(), p.name.c_str(), H5T_IEEE_F32LE,
                                             space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT));
    if (!space.valid() || !ds.valid()) {
      return h5::Error(absl::StatusCode::kInternal, absl::StrCat("cannot create ", label));
    }
    if (p.numel > 0) {
      params.backend()->CopyToHost(host.data(), arena + p.offset, p.numel * sizeof(float));
      if (H5Dwrite(ds.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, host.data()) < 0) {
        return h5::Error(absl::StatusCode::kInternal, absl::StrCat("cannot write ", label));
      }
    }
    RETURN_IF_ERROR(h5::Annotate(
        h5::WriteUint32Attr(ds.get(), kCrcAttr, Crc32(host.data(), p.numel)), label + ": "));
  }
  return absl::OkStatus();
}

// Writes everything into the open `file`; every object handle is closed on return.
absl::Status WriteAll(hid_t file, const ParamStore& params, const CheckpointMeta& meta,
                      const float* adam_m, const float* adam_v) {
  RETURN_IF_ERROR(h5::WriteStringAttr(file, "format", kFormat));
  RETURN_IF_ERROR(h5::WriteInt64Attr(file, "format_version", kFormatVersion));
  RETURN_IF_ERROR(h5::WriteStringAttr(file, "config", meta.config_json));
  RETURN_IF_ERROR(h5::WriteInt64Attr(file, "step", meta.step));
  {
    Handle lcpl = LinkPlist();
    Handle attrs =
        h5::GroupHandle(H5Gcreate2(file, kAttrsGroup, lcpl.get(), H5P_DEFAULT, H5P_DEFAULT));
    if (!attrs.valid()) return h5::Error(absl::StatusCode::kInternal, "cannot create /attrs");
    for (const auto& [key, value] : meta.attrs) {
      RETURN_IF_ERROR(h5::Annotate(h5::WriteStringAttr(attrs.get(), key, value), "/attrs: "));
    }
  }
  size_t max_numel = 1;
  for (const ParamInfo& p : params.params()) max_numel = std::max(max_numel, p.numel);
  std::vector<float> host(max_numel);
  params.backend()->Synchronize();
  RETURN_IF_ERROR(WriteTensors(file, kModelGroup, params, params.params_data(), host));
  if (adam_m != nullptr) RETURN_IF_ERROR(WriteTensors(file, kAdamMGroup, params, adam_m, host));
  if (adam_v != nullptr) RETURN_IF_ERROR(WriteTensors(file, kAdamVGroup, params, adam_v, host));
  return absl::OkStatus();
}

// Flushes the closed file at `path` to stable storage.
absl::Status SyncFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("cannot reopen ", path, ": ", strerror(errno)));
  }
  const int r = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (r != 0) return absl::InternalError(absl::StrCat("fsync ", path, ": ", strerror(err)));
  return absl::OkStatus();
}

// ---- opening and loading --------------------------------------------------------------------

// Opens `path` read-only and checks it is an eellm checkpoint of a supported version.
absl::StatusOr<Handle> OpenCheckpoint(const std::string& path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec && status.type() != std::filesystem::file_type::not_found) {
    return absl::FailedPreconditionError(Where(path) + "cannot access the file: " + ec.message());
  }
  if (!std::filesystem::exists(status)) {
    return absl::NotFoundError(Where(path) + "file not found");
  }
  if (std::filesystem::is_directory(status)) {
    return absl::InvalidArgumentError(Where(path) + "is a directory, not a checkpoint file");
  }
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
  if (is_hdf5 < 0) {
    return h5::Error(absl::StatusCode::kDataLoss, Where(path) + "cannot read the file");
  }
  if (is_hdf5 == 0) {
    return absl::InvalidArgumentError(Where(path) + "not an HDF5 file (no HDF5 signature)");
  }
  Handle file = h5::FileHandle(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
  if (!file.valid()) {
    return h5::Error(absl::StatusCode::kDataLoss,
                     Where(path) + "cannot open the HDF5 file (truncated or corrupt?)");
  }
  auto format = h5::ReadStringAttr(file.get(), "format");
  if (!format.ok()) {
    const std::string prefix = Where(path) + "not an eellm checkpoint: ";
    if (format.status().code() != absl::StatusCode::kNotFound) {
      return h5::Annotate(format.status(), prefix);
    }
    return absl::InvalidArgumentError(prefix + std::string(format.status().message()));
  }
  if (*format != kFormat) {
    return absl::InvalidArgumentError(absl::StrCat(Where(path), "not an eellm checkpoint (format '",
                                                   *format, "', expected '", kFormat, "')"));
  }
  auto version = h5::ReadIntAttr(file.get(), "format_version");
  if (!version.ok()) return h5::Annotate(version.status(), Where(path));
  if (*version != kFormatVersion) {
    return absl::InvalidArgumentError(absl::StrCat(Where(path), "unsupported format_version ",
                                                   *version, " (this build reads ", kFormatVersion,
                                                   ")"));
  }
  return file;
}

// Opens the dataset for `p` in `group` and checks its dtype and shape.
absl::StatusOr<Handle> OpenTensor(hid_t group, const char* group_path, const ParamInfo& p) {
  const std::string label = TensorLabel(p.name, group_path);
  if (H5Lexists(group, p.name.c_str(), H5P_DEFAULT) <= 0) {
    return absl::NotFoundError(
        absl::StrCat(label, " not found (expected shape ", ShapeToString(p.shape), ")"));
  }
  Handle ds = h5::DatasetHandle(H5Dopen2(group, p.name.c_str(), H5P_DEFAULT));
  if (!ds.valid()) {
    return h5::Error(absl::StatusCode::kDataLoss, label + " cannot be opened as a dataset");
  }
  Handle type = h5::TypeHandle(H5Dget_type(ds.get()));
  if (!type.valid()) return h5::Error(absl::StatusCode::kDataLoss, label + ": unreadable dtype");
  if (H5Tget_class(type.get()) != H5T_FLOAT || H5Tget_size(type.get()) != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, " has dtype ", h5::DescribeType(type.get()), ", expected f32"));
  }
  auto shape = ReadShape(ds.get());
  if (!shape.ok()) return h5::Annotate(shape.status(), label + " ");
  if (*shape != p.shape) {
    return absl::InvalidArgumentError(absl::StrCat(label, " has shape ", ShapeToString(*shape),
                                                   " in the file, expected ",
                                                   ShapeToString(p.shape)));
  }
  return ds;
}

// Reads a checked dataset, verifies its crc32 and copies it into the device `arena`.
absl::Status ReadTensor(hid_t ds, const char* group_path, const ParamInfo& p, float* arena,
                        Backend* backend, std::vector<float>& host) {
  const std::string label = TensorLabel(p.name, group_path);
  if (p.numel > 0 &&
      H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, host.data()) < 0) {
    return h5::Error(absl::StatusCode::kDataLoss, absl::StrCat("cannot read ", label));
  }
  auto stored = h5::ReadIntAttr(ds, kCrcAttr);
  if (!stored.ok()) {
    return absl::DataLossError(absl::StrCat(label, ": bad checksum: ", stored.status().message()));
  }
  const uint32_t actual = Crc32(host.data(), p.numel);
  if (*stored != static_cast<int64_t>(actual)) {
    return absl::DataLossError(
        absl::StrFormat("%s: checksum mismatch (stored crc32 0x%08x, data has 0x%08x)", label,
                        static_cast<uint64_t>(*stored), actual));
  }
  if (p.numel > 0) backend->CopyFromHost(arena + p.offset, host.data(), p.numel * sizeof(float));
  return absl::OkStatus();
}

}  // namespace

absl::Status SaveCheckpoint(const std::string& path, const ParamStore& params,
                            const CheckpointMeta& meta, const float* adam_m, const float* adam_v) {
  h5::ScopedErrorSilencer silence;
  if (!params.allocated()) {
    return absl::FailedPreconditionError(Where(path) + "ParamStore is not allocated");
  }
  for (const ParamInfo& p : params.params()) {
    RETURN_IF_ERROR(h5::Annotate(ValidateParam(p), Where(path)));
  }
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat(Where(path), "cannot create directory ", parent.string(), ": ", ec.message()));
  }
  const std::string tmp = path + ".tmp";
  Handle fapl = h5::PlistHandle(H5Pcreate(H5P_FILE_ACCESS));
  // 1.8 object format: checksummed metadata, readable by every HDF5 >= 1.8. SEMI makes
  // H5Fclose fail (rather than defer) if an object were still open.
  if (!fapl.valid() || H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_V18) < 0 ||
      H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_SEMI) < 0) {
    return h5::Error(absl::StatusCode::kInternal, Where(path) + "cannot set up file access");
  }
  Handle file = h5::FileHandle(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()));
  if (!file.valid()) {
    return h5::Error(absl::StatusCode::kInternal, Where(path) + "cannot create " + tmp);
  }
  absl::Status status = WriteAll(file.get(), params, meta, adam_m, adam_v);
  if (!file.Close() && status.ok()) {
    status = h5::Error(absl::StatusCode::kInternal, "cannot close (flush) " + tmp);
  }
  if (status.ok()) status = SyncFile(tmp);
  if (status.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) {
    status = absl::InternalError(absl::StrCat("cannot rename ", tmp, ": ", strerror(errno)));
  }
  if (!status.ok()) {
    std::remove(tmp.c_str());
    return h5::Annotate(status, Where(path));
  }
  return absl::OkStatus();
}

absl::StatusOr<CheckpointMeta> ReadCheckpointMeta(const std::string& path) {
  h5::ScopedErrorSilencer silence;
  ASSIGN_OR_RETURN(Handle file, OpenCheckpoint(path));
  CheckpointMeta meta;
  auto config = h5::ReadStringAttr(file.get(), "config");
  if (!config.ok()) return h5::Annotate(config.status(), Where(path));
  meta.config_json = *std::move(config);
  auto step = h5::ReadIntAttr(file.get(), "step");
  if (!step.ok()) return h5::Annotate(step.status(), Where(path));
  meta.step = *step;
  if (!PathExists(file.get(), "attrs")) return meta;
  Handle attrs = h5::GroupHandle(H5Gopen2(file.get(), kAttrsGroup, H5P_DEFAULT));
  if (!attrs.valid()) return h5::Error(absl::StatusCode::kDataLoss, Where(path) + "bad /attrs");
  std::vector<std::string> names;
  auto collect = [](hid_t, const char* name, const H5A_info_t*, void* data) -> herr_t {
    static_cast<std::vector<std::string>*>(data)->push_back(name);
    return 0;
  };
  if (H5Aiterate2(attrs.get(), H5_INDEX_NAME, H5_ITER_INC, nullptr, collect, &names) < 0) {
    return h5::Error(absl::StatusCode::kDataLoss, Where(path) + "cannot list /attrs");
  }
  for (const std::string& name : names) {
    auto value = h5::ReadStringAttr(attrs.get(), name);
    if (!value.ok()) return h5::Annotate(value.status(), Where(path) + "/attrs: ");
    meta.attrs[name] = *std::move(value);
  }
  return meta;
}

absl::Status LoadCheckpoint(const std::string& path, ParamStore& params, float* adam_m,
                            float* adam_v) {
  h5::ScopedErrorSilencer silence;
  if (!params.allocated()) {
    return absl::FailedPreconditionError(Where(path) + "ParamStore is not allocated");
  }
  for (const ParamInfo& p : params.params()) {
    RETURN_IF_ERROR(h5::Annotate(ValidateParam(p), Where(path)));
  }
  ASSIGN_OR_RETURN(Handle file, OpenCheckpoint(path));
  struct Target {
    const char* group_path;
    float* arena;
    Handle group;
  };
  std::vector<Target> targets;
  targets.push_back({kModelGroup, params.params_data(), Handle()});
  if (adam_m != nullptr) targets.push_back({kAdamMGroup, adam_m, Handle()});
  if (adam_v != nullptr) targets.push_back({kAdamVGroup, adam_v, Handle()});
  // Pass 1: every group and dataset exists with the right dtype and shape.
  for (Target& t : targets) {
    if (!PathExists(file.get(), t.group_path + 1)) {  // relative: skip the leading '/'
      const bool optimizer = std::strcmp(t.group_path, kModelGroup) != 0;
      return absl::NotFoundError(
          absl::StrCat(Where(path), "no ", t.group_path, " group",
                       optimizer ? " (the checkpoint has no optimizer state)" : ""));
    }
    t.group = h5::GroupHandle(H5Gopen2(file.get(), t.group_path, H5P_DEFAULT));
    if (!t.group.valid()) {
      return h5::Error(absl::StatusCode::kDataLoss, Where(path) + "cannot open " + t.group_path);
    }
    for (const ParamInfo& p : params.params()) {
      auto ds = OpenTensor(t.group.get(), t.group_path, p);
      if (!ds.ok()) return h5::Annotate(ds.status(), Where(path));
    }
  }
  // Pass 2: read, verify and copy to the device.
  size_t max_numel = 1;
  for (const ParamInfo& p : params.params()) max_numel = std::max(max_numel, p.numel);
  std::vector<float> host(max_numel);
  for (Target& t : targets) {
    for (const ParamInfo& p : params.params()) {
      auto ds = OpenTensor(t.group.get(), t.group_path, p);
      if (!ds.ok()) return h5::Annotate(ds.status(), Where(path));
      RETURN_IF_ERROR(h5::Annotate(
          ReadTensor(ds->get(), t.group_path, p, t.arena, params.backend(), host), Where(path)));
    }
  }
  params.backend()->Synchronize();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::pair<std::string, Shape>>> ListCheckpointTensors(
    const std::string& path) {
  h5::ScopedErrorSilencer silence;
  ASSIGN_OR_RETURN(Handle file, OpenCheckpoint(path));
  if (!PathExists(file.get(), "model")) {
    return absl::DataLossError(Where(path) + "no /model group");
  }
  Handle group = h5::GroupHandle(H5Gopen2(file.get(), kModelGroup, H5P_DEFAULT));
  if (!group.valid()) return h5::Error(absl::StatusCode::kDataLoss, Where(path) + "bad /model");
  H5G_info_t info;
  if (H5Gget_info(group.get(), &info) < 0) {
    return h5::Error(absl::StatusCode::kDataLoss, Where(path) + "cannot list /model");
  }
  // Saved order when the group tracks creation order (ours do), else name order.
  H5_index_t index = H5_INDEX_NAME;
  Handle gcpl = h5::PlistHandle(H5Gget_create_plist(group.get()));
  unsigned order_flags = 0;
  if (gcpl.valid() && H5Pget_link_creation_order(gcpl.get(), &order_flags) >= 0 &&
      (order_flags & H5P_CRT_ORDER_INDEXED)) {
    index = H5_INDEX_CRT_ORDER;
  }
  std::vector<std::pair<std::string, Shape>> out;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t len =
        H5Lget_name_by_idx(group.get(), ".", index, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    if (len < 0 || len > (1 << 20)) {
      return h5::Error(absl::StatusCode::kDataLoss, Where(path) + "cannot list /model");
    }
    std::string name(static_cast<size_t>(len) + 1, '\0');
    if (H5Lget_name_by_idx(group.get(), ".", index, H5_ITER_INC, i, name.data(), name.size(),
                           H5P_DEFAULT) < 0) {
      return h5::Error(absl::StatusCode::kDataLoss, Where(path) + "cannot list /model");
    }
    name.resize(static_cast<size_t>(len));
    Handle ds = h5::DatasetHandle(H5Dopen2(group.get(), name.c_str(), H5P_DEFAULT));
    if (!ds.valid()) {
      return h5::Error(absl::StatusCode::kDataLoss,
                       absl::StrCat(Where(path), "/model/", name, " is not a readable dataset"));
    }
    auto shape = ReadShape(ds.get());
    if (!shape.ok()) {
      return h5::Annotate(shape.status(), absl::StrCat(Where(path), "tensor '", name, "' "));
    }
    out.emplace_back(std::move(name), *std::move(shape));
  }
  return out;
}

}  // namespace eellm
