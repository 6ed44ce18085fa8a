// Safetensors reader and writer (see safetensors.h for the format and the checks).
#include "checkpoints/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/core/dtype.h"
#include "engine/core/status.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // As the reference implementation.
constexpr int kMaxHeaderDepth = 16;                // A valid header nests 3 levels deep.
constexpr char kMetadataKey[] = "__metadata__";
constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";

// A tensor name as it appears in messages (quoted, non-printable bytes escaped).
std::string Quoted(absl::string_view s) {
  return absl::StrCat("\"", absl::Utf8SafeCHexEscape(s), "\"");
}

// A JSON value in messages, shortened (a malicious header may hold huge arrays).
std::string Brief(const json& j) {
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 72) + "...";
  return s;
}

absl::Status HeaderError(const std::string& name, absl::string_view msg) {
  return absl::InvalidArgumentError(absl::StrCat(name, ": ", msg));
}

absl::Status TensorError(const std::string& name, absl::string_view tensor, absl::string_view msg,
                         absl::StatusCode code = absl::StatusCode::kInvalidArgument) {
  return absl::Status(code, absl::StrCat(name, ": tensor ", Quoted(tensor), ": ", msg));
}

uint64_t LoadLe(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void StoreLe(uint64_t v, int bytes, char* p) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Header dtype names: the supported ones, and the other names of the spec (rejected as
// unsupported rather than unknown).
bool LookupDtype(absl::string_view s, StDtype* dtype, bool* known) {
  *known = true;
  if (s == "F32")
    *dtype = StDtype::kF32;
  else if (s == "F16")
    *dtype = StDtype::kF16;
  else if (s == "BF16")
    *dtype = StDtype::kBF16;
  else {
    static const char* const kOthers[] = {
        "F64",  "I64",     "U64",     "I32",     "U32",     "I16",     "U16", "I8",  "U8",
        "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4",  "C64", "E8M0"};
    *known = std::find(std::begin(kOthers), std::end(kOthers), s) != std::end(kOthers);
    return false;
  }
  return true;
}

// Deepest nesting of objects/arrays in `text` (strings skipped), stopping early past `limit`.
int JsonDepth(absl::string_view text, int limit) {
  int depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      max_depth = std::max(max_depth, ++depth);
      if (max_depth > limit) break;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return max_depth;
}

// Parses JSON, flagging duplicate keys within any object in *duplicate (nlohmann keeps the last).
json ParseJsonNoDuplicates(absl::string_view text, std::string* duplicate, bool* has_duplicate) {
  std::vector<std::set<std::string>> keys;
  *has_duplicate = false;
  json::parser_callback_t cb = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && parsed.is_string() &&
            !keys.back().insert(parsed.get_ref<const std::string&>()).second && !*has_duplicate) {
          *has_duplicate = true;
          *duplicate = parsed.get_ref<const std::string&>();
        }
        break;
      default:
        break;
    }
    return true;
  };
  return json::parse(text.begin(), text.end(), cb);
}

struct Entry {
  std::string name;
  StDtype dtype;
  Shape shape;
  int64_t numel;
  uint64_t begin, end;
};

// Validates one tensor entry of the header.
absl::StatusOr<Entry> ParseEntry(const std::string& name, const std::string& tensor, const json& v,
                                 uint64_t buffer_bytes) {
  Entry e;
  e.name = tensor;
  if (!v.is_object()) return TensorError(name, tensor, "header entry is not an object");
  const auto dtype_it = v.find("dtype");
  if (dtype_it == v.end()) return TensorError(name, tensor, "missing \"dtype\"");
  if (!dtype_it->is_string()) return TensorError(name, tensor, "\"dtype\" is not a string");
  const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
  bool known = false;
  if (!LookupDtype(dtype_name, &e.dtype, &known)) {
    return TensorError(name, tensor,
                       absl::StrCat(known ? "unsupported dtype " : "unknown dtype ",
                                    Quoted(dtype_name), " (supported: F32, F16, BF16)"));
  }
  const auto shape_it = v.find("shape");
  if (shape_it == v.end()) return TensorError(name, tensor, "missing \"shape\"");
  if (!shape_it->is_array()) return TensorError(name, tensor, "\"shape\" is not an array");
  e.numel = 1;
  for (const json& d : *shape_it) {
    if (!d.is_number_integer()) {
      return TensorError(name, tensor,
                         absl::StrCat("shape entry ", Brief(d), " is not an integer"));
    }
    if (!d.is_number_unsigned() && d.get<int64_t>() < 0) {
      return TensorError(name, tensor, absl::StrCat("negative dimension ", Brief(d)));
    }
    const uint64_t dim = d.get<uint64_t>();
    const uint64_t max = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    if (dim > max || (dim != 0 && static_cast<uint64_t>(e.numel) > max / dim)) {
      return TensorError(name, tensor, absl::StrCat("shape ", Brief(*shape_it), " overflows"));
    }
    e.numel *= static_cast<int64_t>(dim);
    e.shape.push_back(static_cast<int64_t>(dim));
  }
  const auto off_it = v.find("data_offsets");
  if (off_it == v.end()) return TensorError(name, tensor, "missing \"data_offsets\"");
  if (!off_it->is_array() || off_it->size() != 2 || !(*off_it)[0].is_number_unsigned() ||
      !(*off_it)[1].is_number_unsigned()) {
    return TensorError(name, tensor,
                       absl::StrCat("\"data_offsets\" ", Brief(*off_it),
                                    " is not two non-negative integers [begin, end]"));
  }
  e.begin = (*off_it)[0].get<uint64_t>();
  e.end = (*off_it)[1].get<uint64_t>();
  const std::string offsets = absl::StrCat("data_offsets [", e.begin, ", ", e.end, "]");
  if (e.end < e.begin) return TensorError(name, tensor, absl::StrCat(offsets, ": end < begin"));
  const uint64_t size = static_cast<uint64_t>(StDtypeSize(e.dtype));
  if (static_cast<uint64_t>(e.numel) > std::numeric_limits<uint64_t>::max() / size ||
      e.end - e.begin != static_cast<uint64_t>(e.numel) * size) {
    return TensorError(
        name, tensor,
        absl::StrCat(offsets, " hold ", e.end - e.begin, " bytes but shape ", Brief(*shape_it),
                     " of ", dtype_name, " needs ", e.numel, " x ", size),
        absl::StatusCode::kDataLoss);
  }
  if (e.end > buffer_bytes) {
    return TensorError(name, tensor,
                       absl::StrCat(offsets, " exceed the ", buffer_bytes, "-byte data buffer"),
                       absl::StatusCode::kDataLoss);
  }
  return e;
}

// Converts `n` stored little-endian values at `p` to fp32.
void DecodeValues(const unsigned char* p, int64_t n, StDtype dtype, float* out) {
  switch (dtype) {
    case StDtype::kF32:
      for (int64_t i = 0; i < n; ++i) {
        out[i] = BitsToFloat(static_cast<uint32_t>(LoadLe(p + 4 * i, 4)));
      }
      break;
    case StDtype::kF16:
      for (int64_t i = 0; i < n; ++i) {
        out[i] = F16BitsToFloat(static_cast<uint16_t>(LoadLe(p + 2 * i, 2)));
      }
      break;
    case StDtype::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        out[i] = Bf16ToFloat(bf16{static_cast<uint16_t>(LoadLe(p + 2 * i, 2))});
      }
      break;
  }
}

// Converts `n` fp32 values to `dtype`, little-endian, at `out`.
void EncodeValues(const float* in, int64_t n, StDtype dtype, char* out) {
  switch (dtype) {
    case StDtype::kF32:
      for (int64_t i = 0; i < n; ++i) StoreLe(FloatToBits(in[i]), 4, out + 4 * i);
      break;
    case StDtype::kF16:
      for (int64_t i = 0; i < n; ++i) StoreLe(FloatToF16Bits(in[i]), 2, out + 2 * i);
      break;
    case StDtype::kBF16:
      for (int64_t i = 0; i < n; ++i) StoreLe(FloatToBf16(in[i]).bits, 2, out + 2 * i);
      break;
  }
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string msg = absl::StrCat("cannot open ", path, ": ", strerror(err));
    if (err == ENOENT || err == ENOTDIR) return absl::NotFoundError(msg);
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
    return absl::InternalError(msg);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  std::string data;
  data.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t r = ::read(fd, buf, sizeof(buf));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      ::close(fd);
      return absl::DataLossError(absl::StrCat("cannot read ", path, ": ", strerror(err)));
    }
    if (r == 0) break;
    data.append(buf, static_cast<size_t>(r));
  }
  ::close(fd);
  return data;
}

// Writes to a file descriptor, retrying short writes.
class FdWriter {
 public:
  FdWriter(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  absl::Status Write(const char* p, size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        return absl::InternalError(absl::StrCat("cannot write ", path_, ": ", strerror(errno)));
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
    return absl::OkStatus();
  }

 private:
  int fd_;
  std::string path_;
};

// Writes `path` atomically: `body` writes path + ".tmp", which is fsynced and renamed.
absl::Status WriteAtomically(const std::string& path,
                             const std::function<absl::Status(FdWriter&)>& body) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("cannot create ", tmp, ": ", strerror(errno)));
  }
  FdWriter writer(fd, tmp);
  absl::Status status = body(writer);
  if (status.ok() && ::fsync(fd) != 0) {
    status = absl::InternalError(absl::StrCat("fsync ", tmp, ": ", strerror(errno)));
  }
  if (::close(fd) != 0 && status.ok()) {
    status = absl::InternalError(absl::StrCat("cannot close ", tmp, ": ", strerror(errno)));
  }
  if (status.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) {
    status = absl::InternalError(absl::StrCat("cannot rename ", tmp, ": ", strerror(errno)));
  }
  if (!status.ok()) {
    std::remove(tmp.c_str());
    return status;
  }
  // Make the rename durable (best effort: some file systems refuse to fsync a directory).
  const std::string parent = fs::path(path).parent_path().string();
  const int dfd = ::open(parent.empty() ? "." : parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

// Checks that every tensor can be written; returns each one's element count.
absl::StatusOr<std::vector<int64_t>> CheckTensors(const std::string& name,
                                                  const HostTensorMap& tensors) {
  std::vector<int64_t> numels;
  for (const auto& [tensor, t] : tensors) {
    if (tensor == kMetadataKey) {
      return TensorError(name, tensor, "the name is reserved for the metadata");
    }
    int64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) return TensorError(name, tensor, absl::StrCat("negative dimension ", d));
      if (d != 0 && numel > std::numeric_limits<int64_t>::max() / 4 / d) {
        return TensorError(name, tensor, "shape overflows");
      }
      numel *= d;
    }
    if (static_cast<uint64_t>(numel) != t.data.size()) {
      return TensorError(name, tensor,
                         absl::StrCat("shape [", absl::StrJoin(t.shape, ", "), "] has ", numel,
                                      " elements but the data holds ", t.data.size()));
    }
    numels.push_back(numel);
  }
  return numels;
}

// Writes one file of `tensors` (already checked; numels in map order).
absl::Status WriteFile(const std::string& path,
                       const std::vector<const HostTensorMap::value_type*>& tensors,
                       const std::vector<int64_t>& numels, StDtype dtype,
                       const std::map<std::string, std::string>& metadata) {
  const int64_t size = StDtypeSize(dtype);
  ordered_json header = ordered_json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  uint64_t offset = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const uint64_t bytes = static_cast<uint64_t>(numels[i] * size);
    header[tensors[i]->first] = {{"dtype", StDtypeName(dtype)},
                                 {"shape", tensors[i]->second.shape},
                                 {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const ordered_json::exception& e) {  // Invalid UTF-8 in a name or metadata.
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": a tensor name or metadata string is not valid UTF-8: ", e.what()));
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  return WriteAtomically(path, [&](FdWriter& w) -> absl::Status {
    char prefix[8];
    StoreLe(text.size(), 8, prefix);
    RETURN_IF_ERROR(w.Write(prefix, 8));
    RETURN_IF_ERROR(w.Write(text.data(), text.size()));
    constexpr int64_t kChunk = 1 << 18;  // Elements converted per write.
    std::vector<char> buf(static_cast<size_t>(kChunk * size));
    for (size_t i = 0; i < tensors.size(); ++i) {
      const float* data = tensors[i]->second.data.data();
      for (int64_t start = 0; start < numels[i]; start += kChunk) {
        const int64_t n = std::min(kChunk, numels[i] - start);
        EncodeValues(data + start, n, dtype, buf.data());
        RETURN_IF_ERROR(w.Write(buf.data(), static_cast<size_t>(n * size)));
      }
    }
    return absl::OkStatus();
  });
}

// Reads a sharded model from its index file.
absl::StatusOr<SafetensorsFile> ReadShardedModel(const std::string& index_path) {
  ASSIGN_OR_RETURN(const std::string text, ReadWholeFile(index_path));
  json index;
  std::string duplicate;
  bool has_duplicate = false;
  try {
    index = ParseJsonNoDuplicates(text, &duplicate, &has_duplicate);
  } catch (const json::exception& e) {
    return HeaderError(index_path, absl::StrCat("not valid JSON: ", e.what()));
  }
  if (text.find('\0') != std::string::npos) {  // nlohmann would stop reading at it.
    return HeaderError(index_path, "not valid JSON: it holds a NUL byte");
  }
  if (!index.is_object()) return HeaderError(index_path, "not a JSON object");
  if (has_duplicate) {
    return HeaderError(index_path, absl::StrCat("duplicate key ", Quoted(duplicate)));
  }
  const auto wm = index.find("weight_map");
  if (wm == index.end() || !wm->is_object()) {
    return HeaderError(index_path, "missing \"weight_map\" object");
  }
  std::map<std::string, std::vector<std::string>> by_file;  // File -> tensors listed for it.
  for (const auto& [tensor, file] : wm->items()) {
    if (!file.is_string()) {
      return TensorError(index_path, tensor, "weight_map value is not a file name");
    }
    const std::string& f = file.get_ref<const std::string&>();
    const fs::path p(f);
    if (f.empty() || p.is_absolute() ||
        std::any_of(p.begin(), p.end(), [](const fs::path& c) { return c == ".."; })) {
      return TensorError(index_path, tensor,
                         absl::StrCat("file ", Quoted(f), " is not a name inside the directory"));
    }
    by_file[f].push_back(tensor);
  }
  const fs::path dir = fs::path(index_path).parent_path();
  SafetensorsFile out;
  for (const auto& [file, listed] : by_file) {
    const std::string path = (dir / file).string();
    auto shard = ReadSafetensorsFile(path);
    if (!shard.ok()) {
      return absl::Status(shard.status().code(),
                          absl::StrCat(index_path, ": shard ", Quoted(file), " (holding tensor ",
                                       Quoted(listed.front()), "): ", shard.status().message()));
    }
    for (auto& [tensor, t] : shard->tensors) {
      const auto it = wm->find(tensor);
      if (it == wm->end()) {
        return TensorError(index_path, tensor,
                           absl::StrCat("found in ", Quoted(file), " but not in the weight_map"));
      }
      if (it->get_ref<const std::string&>() != file) {
        return TensorError(
            index_path, tensor,
            absl::StrCat("found in ", Quoted(file), " but the weight_map maps it to ",
                         Quoted(it->get_ref<const std::string&>())));
      }
      if (out.tensors.count(tensor) != 0) {
        return TensorError(index_path, tensor, "appears twice");
      }
      out.dtypes[tensor] = shard->dtypes.at(tensor);
      out.tensors[tensor] = std::move(t);
    }
    for (const std::string& tensor : listed) {
      if (out.tensors.count(tensor) == 0) {
        return TensorError(index_path, tensor,
                           absl::StrCat("listed in the weight_map but missing from ", Quoted(file)),
                           absl::StatusCode::kDataLoss);
      }
    }
    out.metadata.insert(shard->metadata.begin(), shard->metadata.end());
  }
  return out;
}

}  // namespace

const char* StDtypeName(StDtype dtype) {
  switch (dtype) {
    case StDtype::kF32:
      return "F32";
    case StDtype::kF16:
      return "F16";
    case StDtype::kBF16:
      return "BF16";
  }
  return "?";
}

int StDtypeSize(StDtype dtype) { return dtype == StDtype::kF32 ? 4 : 2; }

absl::StatusOr<StDtype> ParseStDtype(absl::string_view name) {
  const std::string s = absl::AsciiStrToLower(name);
  if (s == "f32" || s == "fp32" || s == "float32") return StDtype::kF32;
  if (s == "f16" || s == "fp16" || s == "float16") return StDtype::kF16;
  if (s == "bf16" || s == "bfloat16") return StDtype::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype \"", name, "\" (expected F32, F16 or BF16)"));
}

uint16_t FloatToF16Bits(float f) {
  uint32_t x = FloatToBits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) {  // NaN: keep the top payload bits, force a quiet NaN.
    return static_cast<uint16_t>(sign | 0x7e00u | ((x >> 13) & 0x3ffu));
  }
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (incl. inf) rounds to inf.
  if (x >= 0x38800000u) {                       // Normal: >= 2^-14.
    uint32_t m = x - 0x38000000u;               // Rebias the exponent (127 - 15).
    m += 0xfffu + ((m >> 13) & 1u);             // Round to nearest even.
    return static_cast<uint16_t>(sign | (m >> 13));
  }
  if (x < 0x33000000u) return sign;  // Below 2^-25: rounds to (signed) zero.
  // Subnormal: value * 2^24, rounded to nearest even.
  const uint32_t mant = (x & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - (x >> 23);  // 14..24
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

float F16BitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return BitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  // Zero or subnormal: mant * 2^-24 (exact in fp32).
  const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

absl::StatusOr<SafetensorsFile> ParseSafetensors(absl::string_view bytes, const std::string& name) {
  if (bytes.size() < 8) {
    return absl::DataLossError(absl::StrCat(name, ": file is ", bytes.size(),
                                            " bytes, shorter than the 8-byte header size"));
  }
  const auto* base = reinterpret_cast<const unsigned char*>(bytes.data());
  const uint64_t n = LoadLe(base, 8);
  if (n > kMaxHeaderBytes) {
    return HeaderError(
        name, absl::StrCat("header size ", n, " exceeds the limit of ", kMaxHeaderBytes, " bytes"));
  }
  if (n > bytes.size() - 8) {
    return absl::DataLossError(absl::StrCat(name, ": header size ", n, " exceeds the ",
                                            bytes.size() - 8, " bytes after the size field"));
  }
  const absl::string_view header_text = bytes.substr(8, n);
  if (header_text.empty() || header_text[0] != '{') {
    return HeaderError(name, "header does not start with '{'");
  }
  // nlohmann's parser takes a NUL byte for the end of the input; JSON never holds one.
  if (header_text.find('\0') != absl::string_view::npos) {
    return HeaderError(name, "header is not valid JSON: it holds a NUL byte");
  }
  if (JsonDepth(header_text, kMaxHeaderDepth) > kMaxHeaderDepth) {
    return HeaderError(name, absl::StrCat("header nests deeper than ", kMaxHeaderDepth, " levels"));
  }
  json header;
  std::string duplicate;
  bool has_duplicate = false;
  try {
    header = ParseJsonNoDuplicates(header_text, &duplicate, &has_duplicate);
  } catch (const json::exception& e) {
    return HeaderError(name, absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) return HeaderError(name, "header is not a JSON object");
  if (has_duplicate) {
    return HeaderError(name, absl::StrCat("duplicate key ", Quoted(duplicate), " in the header"));
  }
  const absl::string_view buffer = bytes.substr(8 + n);
  SafetensorsFile out;
  std::vector<Entry> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      if (value.is_null()) continue;
      if (!value.is_object()) return HeaderError(name, "\"__metadata__\" is not an object");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) {
          return HeaderError(
              name, absl::StrCat("\"__metadata__\" value of ", Quoted(mk), " is not a string"));
        }
        out.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    ASSIGN_OR_RETURN(Entry e, ParseEntry(name, key, value, buffer.size()));
    entries.push_back(std::move(e));
  }
  // The spec: tensors tile the buffer exactly, without overlaps or holes.
  std::vector<const Entry*> order;
  for (const Entry& e : entries) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  uint64_t cursor = 0;
  const Entry* prev = nullptr;
  for (const Entry* e : order) {
    if (e->begin < cursor) {
      return TensorError(name, e->name,
                         absl::StrCat("data_offsets [", e->begin, ", ", e->end, "] overlap tensor ",
                                      Quoted(prev->name), " [", prev->begin, ", ", prev->end, "]"),
                         absl::StatusCode::kDataLoss);
    }
    if (e->begin > cursor) {
      return TensorError(name, e->name,
                         absl::StrCat("bytes [", cursor, ", ", e->begin,
                                      ") of the data buffer before it belong to no tensor"),
                         absl::StatusCode::kDataLoss);
    }
    cursor = e->end;
    prev = e;
  }
  if (cursor != buffer.size()) {
    return absl::DataLossError(absl::StrCat(name, ": bytes [", cursor, ", ", buffer.size(),
                                            ") at the end of the data buffer belong to no tensor"));
  }
  const auto* data = reinterpret_cast<const unsigned char*>(buffer.data());
  for (Entry& e : entries) {
    HostTensor t;
    t.data.resize(static_cast<size_t>(e.numel));
    DecodeValues(data + e.begin, e.numel, e.dtype, t.data.data());
    t.shape = std::move(e.shape);
    out.dtypes[e.name] = e.dtype;
    out.tensors[e.name] = std::move(t);
  }
  return out;
}

absl::StatusOr<SafetensorsFile> ReadSafetensorsFile(const std::string& path) {
  ASSIGN_OR_RETURN(const std::string bytes, ReadWholeFile(path));
  return ParseSafetensors(bytes, path);
}

absl::StatusOr<SafetensorsFile> ReadSafetensorsModel(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
  }
  if (fs::is_directory(st)) {
    const fs::path dir(path);
    if (fs::exists(dir / kSingleFile, ec)) return ReadSafetensorsFile((dir / kSingleFile).string());
    if (fs::exists(dir / kIndexFile, ec)) return ReadShardedModel((dir / kIndexFile).string());
    return absl::NotFoundError(
        absl::StrCat(path, ": holds neither ", kSingleFile, " nor ", kIndexFile));
  }
  if (absl::EndsWith(path, ".json")) return ReadShardedModel(path);
  return ReadSafetensorsFile(path);
}

absl::Status WriteSafetensorsFile(const std::string& path, const HostTensorMap& tensors,
                                  StDtype dtype,
                                  const std::map<std::string, std::string>& metadata) {
  ASSIGN_OR_RETURN(const std::vector<int64_t> numels, CheckTensors(path, tensors));
  std::vector<const HostTensorMap::value_type*> list;
  for (const auto& kv : tensors) list.push_back(&kv);
  return WriteFile(path, list, numels, dtype, metadata);
}

absl::Status WriteSafetensorsModel(const std::string& dir, const HostTensorMap& tensors,
                                   StDtype dtype, int64_t max_shard_bytes,
                                   const std::map<std::string, std::string>& metadata) {
  if (max_shard_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, ": max_shard_bytes is negative (", max_shard_bytes, ")"));
  }
  ASSIGN_OR_RETURN(const std::vector<int64_t> numels, CheckTensors(dir, tensors));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir, ec)) {
    return absl::InternalError(absl::StrCat("cannot create directory ", dir, ": ", ec.message()));
  }
  // Group tensors (in name order) into shards.
  struct Shard {
    std::vector<const HostTensorMap::value_type*> tensors;
    std::vector<int64_t> numels;
    int64_t bytes = 0;
  };
  std::vector<Shard> shards(1);
  const int64_t size = StDtypeSize(dtype);
  int64_t total = 0;
  size_t i = 0;
  for (const auto& kv : tensors) {
    const int64_t bytes = numels[i] * size;
    if (max_shard_bytes > 0 && !shards.back().tensors.empty() &&
        shards.back().bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
    }
    shards.back().tensors.push_back(&kv);
    shards.back().numels.push_back(numels[i]);
    shards.back().bytes += bytes;
    total += bytes;
    ++i;
  }
  const fs::path root(dir);
  if (shards.size() == 1) {
    RETURN_IF_ERROR(WriteFile((root / kSingleFile).string(), shards[0].tensors, shards[0].numels,
                              dtype, metadata));
    fs::remove(root / kIndexFile, ec);
    return absl::OkStatus();
  }
  ordered_json weight_map = ordered_json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file =
        absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards.size());
    RETURN_IF_ERROR(
        WriteFile((root / file).string(), shards[s].tensors, shards[s].numels, dtype, metadata));
    for (const auto* kv : shards[s].tensors) weight_map[kv->first] = file;
  }
  ordered_json index = ordered_json::object();
  index["metadata"] = {{"total_size", total}};
  index["weight_map"] = std::move(weight_map);
  const std::string text = index.dump(2) + "\n";  // Names were checked by WriteFile.
  RETURN_IF_ERROR(WriteAtomically((root / kIndexFile).string(),
                                  [&](FdWriter& w) { return w.Write(text.data(), text.size()); }));
  fs::remove(root / kSingleFile, ec);
  return absl::OkStatus();
}

}  // namespace eellm
