#include "checkpoints/sharded_checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "engine/core/status.h"
#include "engine/tensor/tensor.h"

namespace eellm {
namespace fs = std::filesystem;
namespace {

constexpr char kLatest[] = "latest";

std::string Where(const std::string& path) { return absl::StrCat("checkpoint ", path, ": "); }

// Whether moment arenas laid out from arena offset `moments_lo` hold tensor `p`'s moments (a
// frozen tensor has none: saved as zeros, not loaded).
bool HoldsMoments(const ParamInfo& p, size_t moments_lo) {
  return p.trainable && p.offset >= moments_lo;
}

// Points `t`'s moments into the arenas `m`, `v` (laid out from `moments_lo`), or at zeros when
// they do not hold them.
void AttachMoments(FileTensor& t, const ParamInfo& p, const float* m, const float* v,
                   size_t moments_lo) {
  if (m != nullptr && v != nullptr && HoldsMoments(p, moments_lo)) {
    t.adam_m = m + (p.offset - moments_lo);
    t.adam_v = v + (p.offset - moments_lo);
  } else {
    t.zero_moments = true;
  }
}

std::string StepDirName(int64_t step) { return absl::StrFormat("step_%08d", step); }

bool IsStepDirName(const std::string& name) {
  if (name.size() != 13 || name.rfind("step_", 0) != 0) return false;
  return std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Where each tensor's stored blocks are: tensor name -> (file index, block).
struct Block {
  int file = 0;
  TensorSlice slice;
};
using BlockIndex = std::map<std::string, std::vector<Block>>;

// Adds the /model entries of `f` (file number `file`) to `index`, new names to `order`.
absl::Status IndexFile(TensorFile& f, int file, BlockIndex& index,
                       std::vector<std::string>& order) {
  ASSIGN_OR_RETURN(std::vector<TensorFile::Entry> entries, f.Entries());
  for (TensorFile::Entry& e : entries) {
    auto& blocks = index[e.name];
    if (blocks.empty()) order.push_back(e.name);
    blocks.push_back(Block{file, std::move(e.slice)});
  }
  return absl::OkStatus();
}

// The open files of a checkpoint: the top-level one and its shards (or just one file).
struct OpenCheckpoint {
  std::string top_path;
  CheckpointMeta meta;
  std::vector<TensorFile> files;
  BlockIndex index;
  std::vector<std::string> order;  // tensor names in saved order
};

absl::StatusOr<OpenCheckpoint> Open(const std::string& path) {
  OpenCheckpoint ck;
  ASSIGN_OR_RETURN(ck.top_path, ResolveCheckpoint(path));
  ASSIGN_OR_RETURN(TensorFile top, TensorFile::Open(ck.top_path));
  ck.meta = top.meta();
  std::vector<std::string> shards = top.shards();
  if (shards.empty()) {
    ck.files.push_back(std::move(top));
  } else {
    const fs::path dir = fs::path(ck.top_path).parent_path();
    for (const std::string& s : shards) {
      ASSIGN_OR_RETURN(TensorFile f, TensorFile::Open((dir / s).string()));
      ck.files.push_back(std::move(f));
    }
  }
  for (int i = 0; i < static_cast<int>(ck.files.size()); ++i) {
    RETURN_IF_ERROR(IndexFile(ck.files[i], i, ck.index, ck.order));
  }
  return ck;
}

// Checks that `blocks` of tensor `name` share one global shape and tile it exactly.
absl::Status CheckTiling(const std::string& name, const std::vector<Block>& blocks,
                         const std::vector<std::string>& files, const std::string& where) {
  const Shape& global = blocks[0].slice.global_shape;
  int64_t covered = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks[i].slice.global_shape != global) {
      return absl::DataLossError(absl::StrCat(where, "tensor '", name, "' has global shape ",
                                              ShapeToString(global), " in ", files[blocks[0].file],
                                              " but ", ShapeToString(blocks[i].slice.global_shape),
                                              " in ", files[blocks[i].file]));
    }
    for (size_t j = 0; j < i; ++j) {
      if (OverlapElements(blocks[i].slice, blocks[j].slice) > 0) {
        return absl::DataLossError(
            absl::StrCat(where, "tensor '", name, "': blocks ", SliceToString(blocks[j].slice),
                         " in ", files[blocks[j].file], " and ", SliceToString(blocks[i].slice),
                         " in ", files[blocks[i].file], " overlap"));
      }
    }
    covered += NumElements(blocks[i].slice.shape);
  }
  if (covered != NumElements(global)) {
    return absl::DataLossError(absl::StrCat(where, "tensor '", name, "': the stored blocks cover ",
                                            covered, " of its ", NumElements(global),
                                            " elements (a shard is missing)"));
  }
  return absl::OkStatus();
}

// Writes `text` to `path` atomically (temporary file, sync, rename).
absl::Status WriteTextAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.close();
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  RETURN_IF_ERROR(SyncPath(tmp));
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

}  // namespace

std::string StagingDir(const std::string& root, int64_t step) {
  return (fs::path(root) / (StepDirName(step) + ".tmp")).string();
}

absl::StatusOr<std::string> PublishCheckpoint(const std::string& root, const CheckpointMeta& meta,
                                              int keep_last) {
  const std::string tmp = StagingDir(root, meta.step);
  std::vector<std::string> shards;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(tmp, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("shard_", 0) == 0 && e.path().extension() == ".h5") shards.push_back(name);
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot list ", tmp, ": ", ec.message()));
  if (shards.empty()) return absl::InternalError(absl::StrCat("no shard files in ", tmp));
  std::sort(shards.begin(), shards.end());
  // Index the shards and check that every tensor is tiled exactly.
  BlockIndex index;
  std::vector<std::string> order;
  bool optimizer = true;
  for (int i = 0; i < static_cast<int>(shards.size()); ++i) {
    ASSIGN_OR_RETURN(TensorFile f, TensorFile::Open((fs::path(tmp) / shards[i]).string()));
    optimizer &= f.HasGroup(TensorGroup::kAdamM) && f.HasGroup(TensorGroup::kAdamV);
    RETURN_IF_ERROR(IndexFile(f, i, index, order));
  }
  std::vector<VirtualTensor> virt;
  for (TensorGroup g : {TensorGroup::kModel, TensorGroup::kAdamM, TensorGroup::kAdamV}) {
    if (g != TensorGroup::kModel && !optimizer) break;
    for (const std::string& name : order) {
      const std::vector<Block>& blocks = index[name];
      RETURN_IF_ERROR(CheckTiling(name, blocks, shards, Where(tmp)));
      VirtualTensor v{g, name, blocks[0].slice.global_shape, {}};
      for (const Block& b : blocks) v.sources.push_back({shards[b.file], b.slice});
      virt.push_back(std::move(v));
    }
  }
  TensorFileOptions options;
  options.shards = shards;
  options.virtual_tensors = std::move(virt);
  RETURN_IF_ERROR(
      WriteTensorFile((fs::path(tmp) / kCheckpointTopFile).string(), meta, {}, options));
  RETURN_IF_ERROR(SyncPath(tmp));
  // Publish: rename the directory, then point `latest` at it.
  const std::string step_name = StepDirName(meta.step);
  const fs::path final_dir = fs::path(root) / step_name;
  fs::remove_all(final_dir, ec);  // an earlier save of the same step
  if (std::rename(tmp.c_str(), final_dir.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot rename ", tmp, " to ", final_dir.string()));
  }
  RETURN_IF_ERROR(SyncPath(root));
  RETURN_IF_ERROR(WriteTextAtomically((fs::path(root) / kLatest).string(), step_name + "\n"));
  RETURN_IF_ERROR(SyncPath(root));
  if (keep_last > 0) {
    std::vector<std::string> steps;
    for (const auto& e : fs::directory_iterator(root, ec)) {
      const std::string name = e.path().filename().string();
      if (e.is_directory() && IsStepDirName(name) && name != step_name) steps.push_back(name);
    }
    std::sort(steps.begin(), steps.end());
    const int drop = static_cast<int>(steps.size()) - (keep_last - 1);
    for (int i = 0; i < drop; ++i) fs::remove_all(fs::path(root) / steps[i], ec);
  }
  return final_dir.string();
}

absl::Status WriteShard(const std::string& staging_dir, const std::string& shard_name,
                        const CheckpointMeta& meta, const std::vector<ChunkState>& chunks,
                        int fail_after_tensors) {
  std::vector<FileTensor> tensors;
  Backend* be = nullptr;
  for (const ChunkState& c : chunks) {
    if (be != nullptr && c.params->backend() != be) {
      return absl::InvalidArgumentError("the chunks of one shard must share a backend");
    }
    be = c.params->backend();
    const std::set<std::string> skip(c.skip.begin(), c.skip.end());
    for (const ParamInfo& info : c.params->params()) {
      if (skip.count(info.name)) continue;
      FileTensor t;
      t.name = info.name;
      t.slice = TpSlice(info.shape, info.split_dim, c.tp_rank, c.tp_size, info.tp_replicas);
      t.model = c.params->params_data() + info.offset;
      if ((c.adam_m != nullptr && c.adam_v != nullptr) || c.zero_moments) {
        AttachMoments(t, info, c.adam_m, c.adam_v, c.moments_lo);
      }
      tensors.push_back(std::move(t));
    }
  }
  TensorFileOptions fo;
  fo.backend = be;
  fo.fail_after_tensors = fail_after_tensors;
  return WriteTensorFile((fs::path(staging_dir) / ("shard_" + shard_name + ".h5")).string(), meta,
                         tensors, fo);
}

absl::StatusOr<std::string> ResolveCheckpoint(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return absl::NotFoundError(Where(path) + "not found");
  if (!fs::is_directory(path, ec)) return path;
  const fs::path dir(path);
  if (fs::exists(dir / kLatest, ec)) {
    std::ifstream in(dir / kLatest);
    std::string name;
    std::getline(in, name);
    name = std::string(absl::StripAsciiWhitespace(name));
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
      return absl::DataLossError(
          absl::StrCat(Where(path), "file 'latest' does not name a step directory ('", name, "')"));
    }
    const fs::path top = dir / name / kCheckpointTopFile;
    if (!fs::exists(top, ec)) {
      return absl::NotFoundError(absl::StrCat(Where(path), "'latest' names ", name, " but ",
                                              top.string(), " does not exist"));
    }
    return top.string();
  }
  if (fs::exists(dir / kCheckpointTopFile, ec)) return (dir / kCheckpointTopFile).string();
  return absl::NotFoundError(absl::StrCat(Where(path), "directory holds neither a 'latest' file ",
                                          "nor ", kCheckpointTopFile));
}

absl::StatusOr<CheckpointMeta> ReadCheckpointMeta(const std::string& path) {
  ASSIGN_OR_RETURN(std::string top, ResolveCheckpoint(path));
  return ReadTensorFileMeta(top);
}

absl::StatusOr<std::string> SaveShardedCheckpoint(
    const std::string& root, const CheckpointMeta& meta, const std::vector<ChunkState>& chunks,
    const std::string& shard_name, Communicator& world, const ShardedSaveOptions& options) {
  const std::string tmp = StagingDir(root, meta.step);
  // Collective agreement: every rank learns whether any rank failed.
  Backend* be = options.backend;
  auto any_failed = [&](const absl::Status& s) {
    float flag = s.ok() ? 0.0f : 1.0f;
    if (be == nullptr) {
      world.AllReduce(&flag, 1, ReduceOp::kMax);
    } else {  // a device communicator needs device memory
      Buffer buf(be, sizeof(float));
      be->CopyFromHost(buf.data(), &flag, sizeof(float));
      world.AllReduce(buf.f32(), 1, ReduceOp::kMax);
      be->CopyToHost(&flag, buf.data(), sizeof(float));
    }
    return flag != 0.0f;
  };
  absl::Status status;
  if (world.rank() == 0) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp, ec);
    if (ec) {
      status = absl::InternalError(absl::StrCat("cannot create ", tmp, ": ", ec.message()));
    }
  }
  if (any_failed(status)) {
    return status.ok() ? absl::InternalError(absl::StrCat("rank 0 cannot create ", tmp)) : status;
  }
  if (!shard_name.empty()) {
    status = WriteShard(tmp, shard_name, meta, chunks, options.fail_after_tensors);
  }
  if (status.ok() && options.write_more) status = options.write_more(tmp);
  if (any_failed(status)) {
    if (world.rank() == 0) {
      std::error_code ec;
      fs::remove_all(tmp, ec);
    }
    if (!status.ok()) return status;
    return absl::AbortedError(absl::StrCat(
        "checkpoint ", tmp, ": another rank failed to write its shard; the save was abandoned ",
        "and the previous checkpoint is still 'latest'"));
  }
  absl::StatusOr<std::string> dir = std::string();
  if (world.rank() == 0) {
    dir = PublishCheckpoint(root, meta, options.keep_last);
    if (!dir.ok()) {
      std::error_code ec;
      fs::remove_all(tmp, ec);
    }
  }
  if (any_failed(dir.status())) {
    if (!dir.ok()) return dir.status();
    return absl::InternalError(
        absl::StrCat("checkpoint ", tmp, ": rank 0 failed to complete the save"));
  }
  return (fs::path(root) / StepDirName(meta.step)).string();
}

absl::Status LoadCheckpoint(const std::string& path, const std::vector<ChunkState>& chunks) {
  ASSIGN_OR_RETURN(OpenCheckpoint ck, Open(path));
  std::vector<std::string> file_names;
  for (const TensorFile& f : ck.files) file_names.push_back(f.path());
  const std::string where = Where(ck.top_path);
  // Pass 1: every tensor is present, tiled, and has the global shape this model expects.
  for (const ChunkState& c : chunks) {
    for (const ParamInfo& p : c.params->params()) {
      const TensorSlice want = TpSlice(p.shape, p.split_dim, c.tp_rank, c.tp_size, p.tp_replicas);
      auto it = ck.index.find(p.name);
      if (it == ck.index.end()) {
        return absl::NotFoundError(absl::StrCat(where, "tensor '", p.name,
                                                "' not found (expected shape ",
                                                ShapeToString(want.global_shape), ")"));
      }
      RETURN_IF_ERROR(CheckTiling(p.name, it->second, file_names, where));
      const Shape& stored = it->second[0].slice.global_shape;
      if (stored != want.global_shape) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "tensor '", p.name, "' has shape ", ShapeToString(stored),
                         " in the checkpoint, expected ", ShapeToString(want.global_shape)));
      }
      if (c.adam_m != nullptr) {
        for (const Block& b : it->second) {
          TensorFile& f = ck.files[b.file];
          if (!f.HasGroup(TensorGroup::kAdamM) || !f.HasGroup(TensorGroup::kAdamV)) {
            return absl::NotFoundError(absl::StrCat(
                Where(f.path()), "no /optimizer group (the checkpoint has no optimizer state)"));
          }
        }
      }
    }
  }
  // Pass 2: read the overlapping blocks (checksums verified) and assemble each rank's block.
  std::vector<float> block, mine;
  for (const ChunkState& c : chunks) {
    Backend* be = c.params->backend();
    for (TensorGroup g : {TensorGroup::kModel, TensorGroup::kAdamM, TensorGroup::kAdamV}) {
      float* arena = g == TensorGroup::kModel   ? c.params->params_data()
                     : g == TensorGroup::kAdamM ? c.adam_m
                                                : c.adam_v;
      if (arena == nullptr) continue;
      const size_t arena_lo = g == TensorGroup::kModel ? 0 : c.moments_lo;
      for (const ParamInfo& p : c.params->params()) {
        if (g != TensorGroup::kModel && !HoldsMoments(p, c.moments_lo)) continue;
        const TensorSlice want = TpSlice(p.shape, p.split_dim, c.tp_rank, c.tp_size, p.tp_replicas);
        mine.assign(p.numel, 0.0f);
        for (const Block& b : ck.index[p.name]) {
          if (OverlapElements(b.slice, want) == 0 && p.numel > 0) continue;
          RETURN_IF_ERROR(ck.files[b.file].Read(g, p.name, b.slice.shape, block));
          if (p.numel > 0) CopyOverlap(b.slice, block.data(), want, mine.data());
        }
        if (p.numel > 0) {
          be->CopyFromHost(arena + (p.offset - arena_lo), mine.data(), p.numel * sizeof(float));
        }
      }
    }
    be->Synchronize();
  }
  return absl::OkStatus();
}

absl::Status SaveCheckpoint(const std::string& path, const ParamStore& params,
                            const CheckpointMeta& meta, const float* adam_m, const float* adam_v) {
  if (!params.allocated()) {
    return absl::FailedPreconditionError(Where(path) + "ParamStore is not allocated");
  }
  std::vector<FileTensor> tensors;
  for (const ParamInfo& info : params.params()) {
    FileTensor t{info.name, WholeSlice(info.shape), params.params_data() + info.offset};
    if (adam_m != nullptr && adam_v != nullptr) {
      AttachMoments(t, info, adam_m, adam_v, params.grad_lo());
    }
    tensors.push_back(std::move(t));
  }
  TensorFileOptions fo;
  fo.backend = params.backend();
  return WriteTensorFile(path, meta, tensors, fo);
}

absl::Status LoadCheckpoint(const std::string& path, ParamStore& params, float* adam_m,
                            float* adam_v) {
  if (!params.allocated()) {
    return absl::FailedPreconditionError(Where(path) + "ParamStore is not allocated");
  }
  ChunkState c;
  c.params = &params;
  c.adam_m = adam_m;
  c.adam_v = adam_v;
  c.moments_lo = params.grad_lo();
  return LoadCheckpoint(path, std::vector<ChunkState>{c});
}

absl::StatusOr<std::vector<std::pair<std::string, Shape>>> ListCheckpointTensors(
    const std::string& path) {
  ASSIGN_OR_RETURN(OpenCheckpoint ck, Open(path));
  std::vector<std::pair<std::string, Shape>> out;
  for (const std::string& name : ck.order) {
    out.emplace_back(name, ck.index[name][0].slice.global_shape);
  }
  return out;
}

absl::StatusOr<bool> CheckpointHasOptimizerState(const std::string& path) {
  ASSIGN_OR_RETURN(OpenCheckpoint ck, Open(path));
  for (const TensorFile& f : ck.files) {
    if (!f.HasGroup(TensorGroup::kAdamM) || !f.HasGroup(TensorGroup::kAdamV)) return false;
  }
  return true;
}

}  // namespace eellm
