// TorchFile: reads a file written by torch.save (the zip format of PyTorch 1.6 and later, which
// Megatron-LM and EE-LLM checkpoints use) without Python or libtorch. The zip (libzip, Zip64 for
// files over 4 GB) holds <archive>/data.pkl, a pickle of the saved object, and one entry
// <archive>/data/<key> per storage. The pickle is read by checkpoints/pickle.h, which runs no
// code; tensors in it are calls of torch._utils._rebuild_tensor_v2 (or _rebuild_parameter around
// one) on a persistent id ("storage", torch.<Type>Storage, key, location, numel), and
// TorchFile::ReadTensor reads such a tensor's elements from its storage entry, converted to
// fp32 (from fp32, fp16, bf16 or fp64), honouring its offset and strides.
//
// The legacy format (torch.save with _use_new_zipfile_serialization=False, or PyTorch < 1.6) is
// refused with a message saying so.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoints/host_tensor.h"
#include "checkpoints/pickle.h"

namespace eellm {

// A tensor of the pickle, as _rebuild_tensor_v2 describes it.
struct TorchTensorRef {
  std::string storage_type;  // "BFloat16Storage", "FloatStorage", ...
  std::string storage_key;   // data/<key> in the archive
  int64_t storage_numel = 0;
  int64_t offset = 0;  // in elements
  std::vector<int64_t> sizes, strides;
};

class TorchFile {
 public:
  ~TorchFile();
  TorchFile(const TorchFile&) = delete;
  TorchFile& operator=(const TorchFile&) = delete;

  // Opens `path` and reads its pickle. NotFound when the file cannot be opened; InvalidArgument
  // naming the file when it is not a torch.save zip or its pickle is malformed.
  static absl::StatusOr<std::unique_ptr<TorchFile>> Open(const std::string& path);

  const PyValue& root() const { return *pickle_->root; }
  const std::string& path() const { return path_; }

  // Whether `v` is a tensor of this file (a tensor rebuild call); if so and `ref` is not null,
  // describes it.
  static bool IsTensor(const PyValue& v, TorchTensorRef* ref = nullptr);
  // The elements of tensor `v` as fp32, row-major in its sizes. Errors name `what` (the caller's
  // name for the tensor), e.g. a non-float dtype or a view past its storage.
  absl::StatusOr<HostTensor> ReadTensor(const PyValue& v, const std::string& what) const;

 private:
  TorchFile() = default;
  // The bytes of storage `key`, which must hold at least `bytes` (errors name `what`). Valid
  // until the next call; the last storage read is kept.
  absl::StatusOr<const std::string*> ReadStorage(const std::string& key, uint64_t bytes,
                                                 const std::string& what) const;

  std::string path_;
  std::string archive_;  // entry name prefix, "archive/"
  void* zip_ = nullptr;  // zip_t*
  std::unique_ptr<Pickle> pickle_;
  mutable std::string cached_key_;  // the storage ReadStorage read last
  mutable std::unique_ptr<std::string> cached_;
};

}  // namespace eellm
