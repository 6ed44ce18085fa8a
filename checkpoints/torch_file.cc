#include "checkpoints/torch_file.h"

#include <zip.h>

#include <cstdio>
#include <cstring>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoints/safetensors.h"
#include "engine/core/dtype.h"
#include "engine/core/status.h"

namespace eellm {
namespace {

using Kind = PyValue::Kind;

zip_t* Zip(void* z) { return static_cast<zip_t*>(z); }

// Reads entry `index` whole.
absl::StatusOr<std::string> ReadEntry(zip_t* z, zip_uint64_t index, const std::string& what) {
  zip_stat_t st;
  zip_stat_init(&st);
  if (zip_stat_index(z, index, 0, &st) != 0 || !(st.valid & ZIP_STAT_SIZE) ||
      !(st.valid & ZIP_STAT_COMP_SIZE)) {
    return absl::DataLossError(absl::StrCat("cannot stat ", what, ": ", zip_strerror(z)));
  }
  // A size the archive cannot hold (a corrupt or hostile header) is refused before allocating:
  // torch.save stores entries uncompressed; deflate expands at most about 1032-fold.
  const zip_uint64_t limit = st.comp_method == ZIP_CM_STORE ? st.comp_size : st.comp_size * 1032;
  if (st.size > limit) {
    return absl::DataLossError(
        absl::StrCat(what, ": entry claims ", st.size, " bytes from ", st.comp_size, " stored"));
  }
  zip_file_t* f = zip_fopen_index(z, index, 0);
  if (f == nullptr) {
    return absl::DataLossError(absl::StrCat("cannot open ", what, ": ", zip_strerror(z)));
  }
  std::string out(st.size, '\0');
  zip_uint64_t done = 0;
  while (done < st.size) {
    const zip_int64_t n = zip_fread(f, out.data() + done, st.size - done);
    if (n <= 0) break;
    done += static_cast<zip_uint64_t>(n);
  }
  const std::string error = done == st.size ? "" : zip_file_strerror(f);
  zip_fclose(f);
  if (done != st.size) {
    return absl::DataLossError(
        absl::StrCat(what, ": read ", done, " of ", st.size, " bytes: ", error));
  }
  return out;
}

// Element size of a storage type, 0 for the ones ReadTensor cannot convert.
int FloatElementSize(const std::string& type) {
  if (type == "FloatStorage") return 4;
  if (type == "HalfStorage" || type == "BFloat16Storage") return 2;
  if (type == "DoubleStorage") return 8;
  return 0;
}

bool IntTuple(const PyValue& v, std::vector<int64_t>* out) {
  if (!v.is(Kind::kTuple) && !v.is(Kind::kList)) return false;
  out->clear();
  for (const PyPtr& x : v.items) {
    if (!x->is(Kind::kInt)) return false;
    out->push_back(x->i);
  }
  return true;
}

}  // namespace

TorchFile::~TorchFile() {
  if (zip_ != nullptr) zip_discard(Zip(zip_));
}

absl::StatusOr<std::unique_ptr<TorchFile>> TorchFile::Open(const std::string& path) {
  int err = 0;
  zip_t* z = zip_open(path.c_str(), ZIP_RDONLY, &err);
  if (z == nullptr) {
    if (err == ZIP_ER_NOENT || err == ZIP_ER_OPEN) {
      return absl::NotFoundError(absl::StrCat("cannot open ", path));
    }
    if (err == ZIP_ER_NOZIP) {
      // The legacy format starts with a pickled magic number.
      std::FILE* f = std::fopen(path.c_str(), "rb");
      unsigned char head[2] = {0, 0};
      const bool pickle = f != nullptr && std::fread(head, 1, 2, f) == 2 && head[0] == 0x80;
      if (f != nullptr) std::fclose(f);
      if (pickle) {
        return absl::InvalidArgumentError(
            absl::StrCat(path,
                         " is in torch.save's legacy (pre-1.6) format; re-save it with a current "
                         "PyTorch (torch.save(torch.load(p), p)) and convert that"));
      }
    }
    zip_error_t ze;
    zip_error_init_with_code(&ze, err);
    auto s = absl::InvalidArgumentError(
        absl::StrCat(path, " is not a torch.save file (zip): ", zip_error_strerror(&ze)));
    zip_error_fini(&ze);
    return s;
  }
  std::unique_ptr<TorchFile> t(new TorchFile());
  t->zip_ = z;
  t->path_ = path;
  // torch.save writes <archive>/data.pkl, <archive>/data/<key>, <archive>/version, ...
  const zip_int64_t n = zip_get_num_entries(z, 0);
  zip_int64_t pkl = -1;
  for (zip_int64_t i = 0; i < n; ++i) {
    const char* name = zip_get_name(z, static_cast<zip_uint64_t>(i), 0);
    if (name == nullptr) continue;
    const absl::string_view s(name);
    const size_t slash = s.find('/');
    if (slash != absl::string_view::npos && s.substr(slash + 1) == "data.pkl") {
      pkl = i;
      t->archive_ = std::string(s.substr(0, slash + 1));
      break;
    }
  }
  if (pkl < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is a zip but not a torch.save file (no <archive>/data.pkl entry)"));
  }
  const std::string what = absl::StrCat(path, ":", t->archive_, "data.pkl");
  ASSIGN_OR_RETURN(std::string pickle, ReadEntry(z, static_cast<zip_uint64_t>(pkl), what));
  // Storages are raw little-endian elements unless <archive>/byteorder says otherwise.
  const std::string order_name = t->archive_ + "byteorder";
  if (const zip_int64_t order = zip_name_locate(z, order_name.c_str(), 0); order >= 0) {
    ASSIGN_OR_RETURN(std::string o, ReadEntry(z, static_cast<zip_uint64_t>(order), order_name));
    if (o != "little") {
      return absl::InvalidArgumentError(
          absl::StrCat(path, " was saved ", o.substr(0, 16), "-endian; eellm reads little-endian"));
    }
  }
  ASSIGN_OR_RETURN(t->pickle_, ReadPickle(pickle, what));
  return t;
}

bool TorchFile::IsTensor(const PyValue& v, TorchTensorRef* ref) {
  const PyValue* call = &v;
  // _rebuild_parameter(data, requires_grad, backward_hooks): the tensor is its first argument.
  if (call->is(Kind::kObject) && call->str == "torch._utils._rebuild_parameter" &&
      !call->items.empty()) {
    call = call->items[0];
  }
  if (!call->is(Kind::kObject) || call->str != "torch._utils._rebuild_tensor_v2" ||
      call->items.size() < 4) {
    return false;
  }
  const PyValue& storage = *call->items[0];
  if (!storage.is(Kind::kPersistent) || storage.items.empty()) return false;
  // ("storage", torch.<Type>Storage, key, location, numel)
  const PyValue& pid = *storage.items[0];
  if (!pid.is(Kind::kTuple) || pid.items.size() < 5 || !pid.items[0]->is(Kind::kStr) ||
      pid.items[0]->str != "storage" || !pid.items[1]->is(Kind::kGlobal) ||
      !pid.items[2]->is(Kind::kStr) || !pid.items[4]->is(Kind::kInt) ||
      !call->items[1]->is(Kind::kInt)) {
    return false;
  }
  TorchTensorRef r;
  const std::string& type = pid.items[1]->str;
  r.storage_type = absl::StartsWith(type, "torch.") ? type.substr(6) : type;
  r.storage_key = pid.items[2]->str;
  r.storage_numel = pid.items[4]->i;
  r.offset = call->items[1]->i;
  if (!IntTuple(*call->items[2], &r.sizes) || !IntTuple(*call->items[3], &r.strides) ||
      r.sizes.size() != r.strides.size()) {
    return false;
  }
  if (ref != nullptr) *ref = std::move(r);
  return true;
}

absl::StatusOr<const std::string*> TorchFile::ReadStorage(const std::string& key, uint64_t bytes,
                                                          const std::string& what) const {
  const std::string name = absl::StrCat(archive_, "data/", key);
  if (cached_key_ != key || cached_ == nullptr) {  // tensors often share one storage in a row
    const zip_int64_t index = zip_name_locate(Zip(zip_), name.c_str(), 0);
    if (index < 0) {
      return absl::DataLossError(
          absl::StrCat(path_, ": ", what, ": storage entry ", name, " is missing"));
    }
    ASSIGN_OR_RETURN(std::string data, ReadEntry(Zip(zip_), static_cast<zip_uint64_t>(index),
                                                 absl::StrCat(path_, ":", name)));
    cached_ = std::make_unique<std::string>(std::move(data));
    cached_key_ = key;
  }
  if (cached_->size() < bytes) {
    return absl::DataLossError(absl::StrCat(path_, ": ", what, ": storage ", name, " holds ",
                                            cached_->size(), " bytes, the tensor reaches ", bytes));
  }
  return cached_.get();
}

absl::StatusOr<HostTensor> TorchFile::ReadTensor(const PyValue& v, const std::string& what) const {
  TorchTensorRef r;
  if (!IsTensor(v, &r)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": ", what, " is not a tensor (", v.Describe(), ")"));
  }
  const int es = FloatElementSize(r.storage_type);
  if (es == 0) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": ", what, " is a ", r.storage_type,
                                                   " tensor; expected a floating-point one"));
  }
  // Elements and the last element's index, refusing what overflows or leaves the storage (the
  // storage's own numel, and below, its entry's real size).
  HostTensor out;
  int64_t n = 1, last = r.offset;
  bool overflow = r.offset < 0 || r.storage_numel < 0;
  for (size_t d = 0; d < r.sizes.size(); ++d) {
    if (r.sizes[d] < 0 || r.strides[d] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": ", what, " has a negative size or stride"));
    }
    int64_t span = 0;
    overflow = overflow || __builtin_mul_overflow(n, r.sizes[d], &n) ||
               (r.sizes[d] > 0 && (__builtin_mul_overflow(r.sizes[d] - 1, r.strides[d], &span) ||
                                   __builtin_add_overflow(last, span, &last)));
    out.shape.push_back(r.sizes[d]);
  }
  if (n > 0 &&
      (overflow || last >= r.storage_numel || last >= std::numeric_limits<int64_t>::max() / 8)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": ", what, " [", absl::StrJoin(r.sizes, ", "), "] at offset ",
                     r.offset, " reaches past its storage of ", r.storage_numel, " elements"));
  }
  if (n > (int64_t{1} << 34)) {  // 64 GiB of fp32; stride-0 views could claim anything
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": ", what, " has ", n, " elements, more than eellm reads at once"));
  }
  if (n == 0) return out;
  // The storage's entry must hold every element the view reaches.
  ASSIGN_OR_RETURN(const std::string* storage,
                   ReadStorage(r.storage_key, static_cast<uint64_t>(last + 1) * es, what));
  const std::string& bytes = *storage;
  const bool half = r.storage_type == "HalfStorage";
  out.data.resize(static_cast<size_t>(n));
  auto load = [&](int64_t e) -> float {
    const char* p = bytes.data() + e * es;
    if (es == 4) {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    if (es == 8) {
      double d;
      std::memcpy(&d, p, 8);
      return static_cast<float>(d);
    }
    uint16_t h;
    std::memcpy(&h, p, 2);
    return half ? F16BitsToFloat(h) : Bf16ToFloat(bf16{h});
  };
  // Row-major walk over the sizes, storage index by the strides.
  const size_t rank = r.sizes.size();
  std::vector<int64_t> idx(rank, 0);
  int64_t e = r.offset;
  for (int64_t k = 0; k < n; ++k) {
    out.data[static_cast<size_t>(k)] = load(e);
    for (size_t d = rank; d-- > 0;) {
      if (++idx[d] < r.sizes[d]) {
        e += r.strides[d];
        break;
      }
      e -= (r.sizes[d] - 1) * r.strides[d];
      idx[d] = 0;
    }
  }
  return out;
}

}  // namespace eellm
