#include "launch/checkpoint_layout.h"

#include <filesystem>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"

namespace eellm {

namespace fs = std::filesystem;

ChunkState ChunkStateFor(Model& chunk, int tp_rank, int tp_size, bool first_virtual_stage, float* m,
                         float* v) {
  ChunkState st;
  st.params = &chunk.params();
  st.adam_m = m;
  st.adam_v = v;
  st.moments_lo = chunk.params().grad_lo();
  st.tp_rank = tp_rank;
  st.tp_size = tp_size;
  const int emb = chunk.word_embedding();
  for (const ParamInfo& p : st.params->params()) {
    const bool replica = (p.split_dim < 0 && tp_rank != 0) || tp_rank % p.tp_replicas != 0;
    const bool embedding_copy =
        emb >= 0 && p.name == st.params->params()[emb].name && !first_virtual_stage;
    if (replica || embedding_copy) st.skip.push_back(p.name);
  }
  return st;
}

absl::Status WriteLayersPastDepth(const std::string& staging_dir, const CheckpointMeta& meta,
                                  const ModelConfig& c, int depth, const std::string& source,
                                  bool moments, int writer, int writers) {
  std::unique_ptr<Backend> cpu;
  for (int layer = depth; layer < c.num_layers; ++layer) {
    if ((layer - depth) % writers != writer) continue;
    const std::string name = absl::StrCat("rest_l", layer);
    if (moments) {
      // A source saved by such a run holds this very shard (frozen tensors, zero moments):
      // linked, not rewritten, where the file system allows.
      const fs::path from = fs::path(source).parent_path() / ("shard_" + name + ".h5");
      std::error_code ec;
      if (fs::exists(from, ec)) {
        fs::create_hard_link(from, fs::path(staging_dir) / from.filename(), ec);
        if (!ec) continue;
      }
    }
    if (cpu == nullptr) {
      ASSIGN_OR_RETURN(cpu, MakeBackend("cpu"));
    }
    // The layer as the one-layer stage of an uncut model, less its exits (the cut model holds
    // an exit reading depth `depth`) and its copy of a tied word embedding, without gradients.
    ASSIGN_OR_RETURN(auto part, Model::Create(c, cpu.get(), StageSpec{layer, c.num_layers},
                                              TpSpec{}, ModelGradients::kNone));
    ChunkState st = ChunkStateFor(*part, 0, 1, /*first_virtual_stage=*/false);
    for (const ParamInfo& p : part->params().params()) {
      if (Model::IsExitTensor(p.name)) st.skip.push_back(p.name);
    }
    RETURN_IF_ERROR(LoadCheckpoint(source, {st}));
    st.zero_moments = moments;  // frozen tensors, as the run's own shards save them
    RETURN_IF_ERROR(WriteShard(staging_dir, name, meta, {st}));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<LayoutChunk>> SplitForLayout(Model& whole, const float* m,
                                                        const float* v, int tp, int pp) {
  const ModelConfig& c = whole.config();
  if (tp < 1 || pp < 1 || c.num_layers % pp != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot split ", c.num_layers, " layers over pp ", pp, " with tp ", tp));
  }
  Backend* be = whole.backend();
  const ParamStore& wp = whole.params();
  std::vector<float> host_p(wp.size()), host_m, host_v;
  be->CopyToHost(host_p.data(), wp.params_data(), wp.size() * sizeof(float));
  if (m != nullptr && v != nullptr) {
    host_m.resize(wp.size());
    host_v.resize(wp.size());
    be->CopyToHost(host_m.data(), m, wp.size() * sizeof(float));
    be->CopyToHost(host_v.data(), v, wp.size() * sizeof(float));
  }
  std::vector<LayoutChunk> out;
  std::vector<float> block;
  for (int s = 0; s < pp; ++s) {
    for (int t = 0; t < tp; ++t) {
      LayoutChunk lc;
      lc.tp_rank = t;
      lc.tp_size = tp;
      lc.stage = s;
      ASSIGN_OR_RETURN(lc.model, Model::Create(c, be, StageSpec{s, pp}, TpSpec{t, tp, nullptr}));
      ParamStore& ps = lc.model->params();
      if (!host_m.empty()) {
        lc.adam_m = Buffer(be, ps.padded_size() * sizeof(float));
        lc.adam_v = Buffer(be, ps.padded_size() * sizeof(float));
      }
      // Each of this rank's blocks, cut from the whole tensors.
      for (const ParamInfo& p : ps.params()) {
        const int i = wp.Find(p.name);
        if (i < 0) return absl::InternalError(absl::StrCat("no tensor ", p.name));
        const ParamInfo& w = wp.params()[i];
        const TensorSlice from = WholeSlice(w.shape);
        const TensorSlice to = TpSlice(p.shape, p.split_dim, t, tp, p.tp_replicas);
        if (to.global_shape != w.shape) {
          return absl::InternalError(absl::StrCat("tensor ", p.name, ": block of ",
                                                  ShapeToString(to.global_shape), " vs ",
                                                  ShapeToString(w.shape)));
        }
        block.resize(p.numel);
        const std::pair<const std::vector<float>*, float*> targets[] = {
            {&host_p, ps.params_data()}, {&host_m, lc.adam_m.f32()}, {&host_v, lc.adam_v.f32()}};
        for (const auto& [src, dst] : targets) {
          if (src->empty() || p.numel == 0) continue;
          CopyOverlap(from, src->data() + w.offset, to, block.data());
          be->CopyFromHost(dst + p.offset, block.data(), p.numel * sizeof(float));
        }
      }
      out.push_back(std::move(lc));
    }
  }
  return out;
}

absl::StatusOr<std::string> WriteLayoutChunks(const std::string& root, const CheckpointMeta& meta,
                                              const std::vector<LayoutChunk>& chunks,
                                              int keep_last) {
  const std::string staging = StagingDir(root, meta.step);
  std::error_code ec;
  std::filesystem::remove_all(staging, ec);
  std::filesystem::create_directories(staging, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", staging, ": ", ec.message()));
  for (const LayoutChunk& lc : chunks) {
    ChunkState st = ChunkStateFor(*lc.model, lc.tp_rank, lc.tp_size, lc.stage == 0, lc.adam_m.f32(),
                                  lc.adam_v.f32());
    RETURN_IF_ERROR(
        WriteShard(staging, absl::StrCat("tp", lc.tp_rank, "_pp", lc.stage), meta, {st}));
  }
  return PublishCheckpoint(root, meta, keep_last);
}

absl::StatusOr<std::string> WriteCheckpointForLayout(const std::string& root,
                                                     const CheckpointMeta& meta, Model& whole,
                                                     const float* m, const float* v, int tp, int pp,
                                                     int keep_last) {
  ASSIGN_OR_RETURN(std::vector<LayoutChunk> chunks, SplitForLayout(whole, m, v, tp, pp));
  return WriteLayoutChunks(root, meta, chunks, keep_last);
}

}  // namespace eellm
