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
constexpr int64_t kFormatVersion = 2;  // reads 1 and 2
constexpr char kModelGroup[] = "/model";
constexpr char kAdamMGroup[] = "/optimizer/m";
constexpr char kAdamVGroup[] = "/optimizer/v";
constexpr char kAttrsGroup[] = "/attrs";
constexpr char kCrcAttr[] = "crc32";
constexpr char kGlobalShapeAttr[] = "global_shape";
constexpr char kGlobalStartAttr[] = "global_start";

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

absl::Status ValidateTensor(const FileTensor& t) {
  if (t.name.empty() || t.name == "." || t.name.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor name '", t.name, "' cannot be an HDF5 dataset name (empty, '.' or has '/')"));
  }
  if (!SliceInBounds(t.slice)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", t.name, "': block ", SliceToString(t.slice), " of shape ",
                     ShapeToString(t.slice.shape), " does not fit its global shape ",
                     ShapeToString(t.slice.global_shape)));
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

// Creates group `g` and one dataset per tensor. `written` counts tensors across groups (for
// the fail_after_tensors test hook).
absl::Status WriteGroup(hid_t file, TensorGroup g, const std::vector<FileTensor>& tensors,
                        const TensorFileOptions& options, std::vector<float>& staging,
                        int& written) {
  const char* group_path = TensorGroupPath(g);
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
  for (const FileTensor& t : tensors) {
    if (options.fail_after_tensors >= 0 && written >= options.fail_after_tensors) {
      return absl::AbortedError(absl::StrCat("simulated failure after writing ", written,
                                             " tensors (fail_after_tensors)"));
    }
    const float* data = g == TensorGroup::kModel   ? t.model
                        : g == TensorGroup::kAdamM ? t.adam_m
                                                   : t.adam_v;
    const std::string label = TensorLabel(t.name, group_path);
    const Shape& shape = t.slice.shape;
    const size_t numel = static_cast<size_t>(NumElements(shape));
    if (data == nullptr && g != TensorGroup::kModel && t.zero_moments) {
      staging.assign(std::max<size_t>(numel, 1), 0.0f);
      data = staging.data();
    }
    if (data == nullptr) return absl::InvalidArgumentError(label + ": no data given");
    if (options.backend != nullptr && numel > 0 && data != staging.data()) {
      if (staging.size() < numel) staging.resize(numel);
      options.backend->CopyToHost(staging.data(), data, numel * sizeof(float));
      data = staging.data();
    }
    std::vector<hsize_t> dims(shape.begin(), shape.end());
    Handle space = h5::SpaceHandle(
        dims.empty() ? H5Screate(H5S_SCALAR)
                     : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr));
    Handle ds = h5::DatasetHandle(H5Dcreate2(group.get(), t.name.c_str(), H5T_IEEE_F32LE,
                                             space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT));
    if (!space.valid() || !ds.valid()) {
      return h5::Error(absl::StatusCode::kInternal, absl::StrCat("cannot create ", label));
    }
    if (numel > 0 &&
        H5Dwrite(ds.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) {
      return h5::Error(absl::StatusCode::kInternal, absl::StrCat("cannot write ", label));
    }
    RETURN_IF_ERROR(
        h5::Annotate(h5::WriteUint32Attr(ds.get(), kCrcAttr, Crc32(data, numel)), label + ": "));
    if (!t.slice.whole()) {
      RETURN_IF_ERROR(h5::Annotate(
          h5::WriteInt64ArrayAttr(ds.get(), kGlobalShapeAttr, t.slice.global_shape), label + ": "));
      RETURN_IF_ERROR(h5::Annotate(
          h5::WriteInt64ArrayAttr(ds.get(), kGlobalStartAttr, t.slice.start), label + ": "));
    }
    ++written;
  }
  return absl::OkStatus();
}

// Virtual datasets mapping each whole tensor onto the blocks in the shard files.
absl::Status WriteVirtualTensors(hid_t file, const std::vector<VirtualTensor>& tensors) {
  Handle lcpl = LinkPlist();
  for (const VirtualTensor& t : tensors) {
    const std::string label = TensorLabel(t.name, TensorGroupPath(t.group));
    std::vector<hsize_t> dims(t.global_shape.begin(), t.global_shape.end());
    if (dims.empty()) {
      return absl::InvalidArgumentError(label + ": scalars cannot be virtual datasets");
    }
    Handle vspace =
        h5::SpaceHandle(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr));
    Handle dcpl = h5::PlistHandle(H5Pcreate(H5P_DATASET_CREATE));
    if (!vspace.valid() || !dcpl.valid()) {
      return h5::Error(absl::StatusCode::kInternal, label + ": cannot set up a virtual dataset");
    }
    const std::string source_dataset = absl::StrCat(TensorGroupPath(t.group), "/", t.name);
    for (const VirtualTensor::Source& s : t.sources) {
      std::vector<hsize_t> start(s.slice.start.begin(), s.slice.start.end());
      std::vector<hsize_t> count(s.slice.shape.begin(), s.slice.shape.end());
      Handle sspace =
          h5::SpaceHandle(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr));
      if (!sspace.valid() ||
          H5Sselect_hyperslab(vspace.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(),
                              nullptr) < 0 ||
          H5Pset_virtual(dcpl.get(), vspace.get(), s.file.c_str(), source_dataset.c_str(),
                         sspace.get()) < 0) {
        return h5::Error(
            absl::StatusCode::kInternal,
            absl::StrCat(label, ": cannot map block ", SliceToString(s.slice), " of ", s.file));
      }
    }
    H5Sselect_all(vspace.get());
    Handle ds = h5::DatasetHandle(H5Dcreate2(file, source_dataset.c_str(), H5T_IEEE_F32LE,
                                             vspace.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT));
    if (!ds.valid()) {
      return h5::Error(absl::StatusCode::kInternal, absl::StrCat("cannot create ", label));
    }
  }
  return absl::OkStatus();
}

std::string JsonStringArray(const std::vector<std::string>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    absl::StrAppend(&out, i ? ", " : "", "\"", v[i], "\"");  // file names: no quotes inside
  }
  return out + "]";
}

// Writes everything into the open `file`; every object handle is closed on return.
absl::Status WriteAll(hid_t file, const CheckpointMeta& meta,
                      const std::vector<FileTensor>& tensors, const TensorFileOptions& options) {
  RETURN_IF_ERROR(h5::WriteStringAttr(file, "format", kFormat));
  RETURN_IF_ERROR(h5::WriteInt64Attr(file, "format_version", kFormatVersion));
  RETURN_IF_ERROR(h5::WriteStringAttr(file, "config", meta.config_json));
  RETURN_IF_ERROR(h5::WriteInt64Attr(file, "step", meta.step));
  if (!options.shards.empty()) {
    RETURN_IF_ERROR(h5::WriteStringAttr(file, "shards", JsonStringArray(options.shards)));
  }
  {
    Handle lcpl = LinkPlist();
    Handle attrs =
        h5::GroupHandle(H5Gcreate2(file, kAttrsGroup, lcpl.get(), H5P_DEFAULT, H5P_DEFAULT));
    if (!attrs.valid()) return h5::Error(absl::StatusCode::kInternal, "cannot create /attrs");
    for (const auto& [key, value] : meta.attrs) {
      RETURN_IF_ERROR(h5::Annotate(h5::WriteStringAttr(attrs.get(), key, value), "/attrs: "));
    }
  }
  if (!options.shards.empty()) return WriteVirtualTensors(file, options.virtual_tensors);
  int written = 0;
  std::vector<float> staging;
  if (options.backend != nullptr) options.backend->Synchronize();
  RETURN_IF_ERROR(WriteGroup(file, TensorGroup::kModel, tensors, options, staging, written));
  if (!tensors.empty() && tensors[0].has_moments()) {
    RETURN_IF_ERROR(WriteGroup(file, TensorGroup::kAdamM, tensors, options, staging, written));
    RETURN_IF_ERROR(WriteGroup(file, TensorGroup::kAdamV, tensors, options, staging, written));
  }
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
  if (*version < 1 || *version > kFormatVersion) {
    return absl::InvalidArgumentError(absl::StrCat(Where(path), "unsupported format_version ",
                                                   *version, " (this build reads 1 to ",
                                                   kFormatVersion, ")"));
  }
  return file;
}

absl::StatusOr<CheckpointMeta> ReadMeta(hid_t file, const std::string& path) {
  CheckpointMeta meta;
  auto config = h5::ReadStringAttr(file, "config");
  if (!config.ok()) return h5::Annotate(config.status(), Where(path));
  meta.config_json = *std::move(config);
  auto step = h5::ReadIntAttr(file, "step");
  if (!step.ok()) return h5::Annotate(step.status(), Where(path));
  meta.step = *step;
  if (!PathExists(file, "attrs")) return meta;
  Handle attrs = h5::GroupHandle(H5Gopen2(file, kAttrsGroup, H5P_DEFAULT));
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

// Parses the "shards" attribute: a JSON array of plain file names (no directories).
absl::StatusOr<std::vector<std::string>> ParseShards(const std::string& text,
                                                     const std::string& path) {
  std::vector<std::string> out;
  size_t i = text.find('[');
  if (i == std::string::npos || text.find(']') == std::string::npos) {
    return absl::DataLossError(Where(path) + "attribute 'shards' is not a JSON array");
  }
  while (true) {
    const size_t a = text.find('"', i + 1);
    if (a == std::string::npos) break;
    const size_t b = text.find('"', a + 1);
    if (b == std::string::npos) {
      return absl::DataLossError(Where(path) + "attribute 'shards' has an unterminated string");
    }
    std::string name = text.substr(a + 1, b - a - 1);
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
      return absl::DataLossError(
          absl::StrCat(Where(path), "attribute 'shards' names a bad file '", name, "'"));
    }
    out.push_back(std::move(name));
    i = b;
  }
  if (out.empty()) return absl::DataLossError(Where(path) + "attribute 'shards' is empty");
  return out;
}

}  // namespace

const char* TensorGroupPath(TensorGroup g) {
  switch (g) {
    case TensorGroup::kModel:
      return kModelGroup;
    case TensorGroup::kAdamM:
      return kAdamMGroup;
    case TensorGroup::kAdamV:
      return kAdamVGroup;
  }
  return kModelGroup;
}

absl::Status SyncPath(const std::string& path) {
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

absl::Status WriteTensorFile(const std::string& path, const CheckpointMeta& meta,
                             const std::vector<FileTensor>& tensors,
                             const TensorFileOptions& options) {
  h5::ScopedErrorSilencer silence;
  for (const FileTensor& t : tensors) {
    RETURN_IF_ERROR(h5::Annotate(ValidateTensor(t), Where(path)));
    if (t.has_moments() != tensors[0].has_moments() ||
        (!t.zero_moments && (t.adam_v != nullptr) != (t.adam_m != nullptr))) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(path), "tensor '", t.name,
                       "': optimizer state must be given for all tensors or none"));
    }
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
  // 1.8 object format: checksummed metadata, readable by every HDF5 >= 1.8 (1.10 for files
  // with virtual datasets). SEMI makes H5Fclose fail (rather than defer) if an object were
  // still open.
  const H5F_libver_t version = options.shards.empty() ? H5F_LIBVER_V18 : H5F_LIBVER_V110;
  if (!fapl.valid() || H5Pset_libver_bounds(fapl.get(), version, version) < 0 ||
      H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_SEMI) < 0) {
    return h5::Error(absl::StatusCode::kInternal, Where(path) + "cannot set up file access");
  }
  Handle file = h5::FileHandle(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()));
  if (!file.valid()) {
    return h5::Error(absl::StatusCode::kInternal, Where(path) + "cannot create " + tmp);
  }
  absl::Status status = WriteAll(file.get(), meta, tensors, options);
  if (!file.Close() && status.ok()) {
    status = h5::Error(absl::StatusCode::kInternal, "cannot close (flush) " + tmp);
  }
  if (status.ok()) status = SyncPath(tmp);
  if (status.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) {
    status = absl::InternalError(absl::StrCat("cannot rename ", tmp, ": ", strerror(errno)));
  }
  if (!status.ok()) {
    std::remove(tmp.c_str());
    return h5::Annotate(status, Where(path));
  }
  return absl::OkStatus();
}

absl::StatusOr<TensorFile> TensorFile::Open(const std::string& path) {
  h5::ScopedErrorSilencer silence;
  TensorFile f;
  f.path_ = path;
  ASSIGN_OR_RETURN(f.file_, OpenCheckpoint(path));
  ASSIGN_OR_RETURN(f.meta_, ReadMeta(f.file_.get(), path));
  if (h5::HasAttr(f.file_.get(), "shards")) {
    auto text = h5::ReadStringAttr(f.file_.get(), "shards");
    if (!text.ok()) return h5::Annotate(text.status(), Where(path));
    ASSIGN_OR_RETURN(f.shards_, ParseShards(*text, path));
  }
  return f;
}

bool TensorFile::HasGroup(TensorGroup g) const {
  return PathExists(file_.get(), TensorGroupPath(g) + 1);  // relative: skip the leading '/'
}

absl::StatusOr<std::vector<TensorFile::Entry>> TensorFile::Entries() {
  h5::ScopedErrorSilencer silence;
  const std::string& path = path_;
  if (!HasGroup(TensorGroup::kModel)) return absl::DataLossError(Where(path) + "no /model group");
  Handle group = h5::GroupHandle(H5Gopen2(file_.get(), kModelGroup, H5P_DEFAULT));
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
  std::vector<Entry> out;
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
    const std::string label = absl::StrCat(Where(path), "tensor '", name, "'");
    Handle ds = h5::DatasetHandle(H5Dopen2(group.get(), name.c_str(), H5P_DEFAULT));
    if (!ds.valid()) {
      return h5::Error(absl::StatusCode::kDataLoss, label + " is not a readable dataset");
    }
    auto shape = ReadShape(ds.get());
    if (!shape.ok()) return h5::Annotate(shape.status(), label + " ");
    Entry e{name, WholeSlice(*shape)};
    if (h5::HasAttr(ds.get(), kGlobalShapeAttr) || h5::HasAttr(ds.get(), kGlobalStartAttr)) {
      auto global = h5::ReadInt64ArrayAttr(ds.get(), kGlobalShapeAttr);
      if (!global.ok()) return h5::Annotate(global.status(), label + ": ");
      auto start = h5::ReadInt64ArrayAttr(ds.get(), kGlobalStartAttr);
      if (!start.ok()) return h5::Annotate(start.status(), label + ": ");
      e.slice.global_shape = *std::move(global);
      e.slice.start = *std::move(start);
      if (!SliceInBounds(e.slice)) {
        return absl::DataLossError(absl::StrCat(label, ": block ", SliceToString(e.slice),
                                                " does not fit its global shape ",
                                                ShapeToString(e.slice.global_shape)));
      }
    }
    out.push_back(std::move(e));
  }
  return out;
}

absl::Status TensorFile::Read(TensorGroup g, const std::string& name, const Shape& expected,
                              std::vector<float>& out) {
  h5::ScopedErrorSilencer silence;
  const char* group_path = TensorGroupPath(g);
  const std::string label = Where(path_) + TensorLabel(name, group_path);
  if (!HasGroup(g)) {
    return absl::NotFoundError(
        absl::StrCat(Where(path_), "no ", group_path, " group",
                     g != TensorGroup::kModel ? " (the checkpoint has no optimizer state)" : ""));
  }
  const std::string link = absl::StrCat(group_path + 1, "/", name);
  if (H5Lexists(file_.get(), link.c_str(), H5P_DEFAULT) <= 0) {
    return absl::NotFoundError(
        absl::StrCat(label, " not found (expected shape ", ShapeToString(expected), ")"));
  }
  Handle ds = h5::DatasetHandle(H5Dopen2(file_.get(), link.c_str(), H5P_DEFAULT));
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
  if (*shape != expected) {
    return absl::InvalidArgumentError(absl::StrCat(label, " has shape ", ShapeToString(*shape),
                                                   " in the file, expected ",
                                                   ShapeToString(expected)));
  }
  const size_t numel = static_cast<size_t>(NumElements(expected));
  out.resize(numel);
  if (numel > 0 &&
      H5Dread(ds.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) < 0) {
    return h5::Error(absl::StatusCode::kDataLoss, absl::StrCat("cannot read ", label));
  }
  auto stored = h5::ReadIntAttr(ds.get(), kCrcAttr);
  if (!stored.ok()) {
    return absl::DataLossError(absl::StrCat(label, ": bad checksum: ", stored.status().message()));
  }
  const uint32_t actual = Crc32(out.data(), numel);
  if (*stored != static_cast<int64_t>(actual)) {
    return absl::DataLossError(
        absl::StrFormat("%s: checksum mismatch (stored crc32 0x%08x, data has 0x%08x)", label,
                        static_cast<uint64_t>(*stored), actual));
  }
  return absl::OkStatus();
}

absl::StatusOr<CheckpointMeta> ReadTensorFileMeta(const std::string& path) {
  h5::ScopedErrorSilencer silence;
  ASSIGN_OR_RETURN(Handle file, OpenCheckpoint(path));
  return ReadMeta(file.get(), path);
}

}  // namespace eellm
