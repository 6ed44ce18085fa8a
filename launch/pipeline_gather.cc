#include "launch/pipeline_gather.h"

#include <algorithm>
#include <vector>

#include "engine/core/status.h"

namespace eellm {
namespace {

// Copies every tensor of `src` (arena data `src_data`) into the same-named tensor of `dst`.
void CopyByName(Backend* be, const ParamStore& src, const float* src_data, const ParamStore& dst,
                float* dst_data) {
  for (const ParamInfo& p : src.params()) {
    const int j = dst.Find(p.name);
    EE_CHECK(j >= 0, "tensor ", p.name, " missing from the whole model");
    be->Copy(dst_data + dst.params()[j].offset, src_data + p.offset, p.numel * sizeof(float));
  }
}

}  // namespace

absl::StatusOr<GatheredModel> GatherPipeline(Model& stage, const float* m, const float* v,
                                             ParallelContext& ctx) {
  return GatherPipeline(std::vector<Model*>{&stage}, {m}, {v}, ctx);
}

absl::StatusOr<GatheredModel> GatherPipeline(const std::vector<Model*>& chunks,
                                             const std::vector<const float*>& m,
                                             const std::vector<const float*>& v,
                                             ParallelContext& ctx) {
  GatheredModel g;
  if (ctx.coord.dp != 0 || ctx.coord.tp != 0) return g;
  const int n_chunks = static_cast<int>(chunks.size());
  Backend* be = chunks[0]->backend();
  const ModelConfig& c = chunks[0]->config();
  const int pp = ctx.grid.pp(), me = ctx.coord.pp;
  auto moment = [](const std::vector<const float*>& x, int i) -> const float* {
    return i < static_cast<int>(x.size()) ? x[i] : nullptr;
  };
  // Whether moments travel is decided by chunk 0's (the same on every rank).
  const bool with_moments = moment(m, 0) != nullptr;
  if (me != 0) {
    for (int k = 0; k < n_chunks; ++k) {
      ParamStore& ps = chunks[k]->params();
      const size_t bytes = ps.padded_size() * sizeof(float);
      ctx.pp->Send(ps.params_data(), bytes, 0, 3 * k);
      if (with_moments) {
        ctx.pp->Send(moment(m, k), bytes, 0, 3 * k + 1);
        ctx.pp->Send(moment(v, k), bytes, 0, 3 * k + 2);
      }
    }
    return g;
  }
  ASSIGN_OR_RETURN(g.model, Model::Create(c, be));
  const ParamStore& full = g.model->params();
  const size_t full_n = full.padded_size();
  g.m = Buffer(be, full_n * sizeof(float));
  g.v = Buffer(be, full_n * sizeof(float));
  be->Fill(g.m.f32(), full_n, 0.0f);
  be->Fill(g.v.f32(), full_n, 0.0f);
  auto take = [&](const ParamStore& src, const float* p, const float* sm, const float* sv) {
    CopyByName(be, src, p, full, full.params_data());
    if (sm != nullptr) {
      CopyByName(be, src, sm, full, g.m.f32());
      CopyByName(be, src, sv, full, g.v.f32());
    }
  };
  for (int k = 0; k < n_chunks; ++k) {
    ParamStore& ps = chunks[k]->params();
    take(ps, ps.params_data(), with_moments ? moment(m, k) : nullptr,
         with_moments ? moment(v, k) : nullptr);
  }
  for (int s = 1; s < pp; ++s) {
    for (int k = 0; k < n_chunks; ++k) {
      // The sender's arena layout is that of a model built for its virtual stage.
      ASSIGN_OR_RETURN(auto other, Model::Create(c, be, StageSpec{k * pp + s, pp * n_chunks}));
      ParamStore& ops = other->params();
      const size_t obytes = ops.padded_size() * sizeof(float);
      Buffer om, ov;
      ctx.pp->Recv(ops.params_data(), obytes, s, 3 * k);
      if (with_moments) {
        om = Buffer(be, obytes);
        ov = Buffer(be, obytes);
        ctx.pp->Recv(om.data(), obytes, s, 3 * k + 1);
        ctx.pp->Recv(ov.data(), obytes, s, 3 * k + 2);
      }
      take(ops, ops.params_data(), with_moments ? om.f32() : nullptr,
           with_moments ? ov.f32() : nullptr);
    }
  }
  return g;
}

absl::StatusOr<std::unique_ptr<Model>> UnshardTensorParallel(Model& shard, StageSpec stage,
                                                             const float* m, const float* v,
                                                             ParallelContext& ctx, Buffer* out_m,
                                                             Buffer* out_v) {
  Backend* be = shard.backend();
  const int tp = ctx.grid.tp();
  ASSIGN_OR_RETURN(auto whole, Model::Create(shard.config(), be, stage));
  const ParamStore& src = shard.params();
  const ParamStore& dst = whole->params();
  const size_t n = dst.padded_size();
  if (m != nullptr) {
    *out_m = Buffer(be, n * sizeof(float));
    *out_v = Buffer(be, n * sizeof(float));
    be->Fill(out_m->f32(), n, 0.0f);
    be->Fill(out_v->f32(), n, 0.0f);
  }
  std::vector<float> gathered, host;
  Buffer recv;
  // One arena (parameters or a moment) from this rank's layout into the whole model's.
  auto unshard = [&](const float* from, float* to) {
    for (const ParamInfo& p : src.params()) {
      const ParamInfo& q = dst.params()[dst.Find(p.name)];
      if (p.split_dim < 0) {
        be->Copy(to + q.offset, from + p.offset, p.numel * sizeof(float));
        continue;
      }
      if (recv.bytes() < q.numel * sizeof(float)) recv = Buffer(be, q.numel * sizeof(float));
      ctx.tp->AllGather(from + p.offset, recv.f32(), p.numel);  // [tp][local shard]
      if (p.split_dim == 0) {  // rows: the concatenation is the whole tensor
        be->Copy(to + q.offset, recv.f32(), q.numel * sizeof(float));
        continue;
      }
      // Columns: rank r's [rows, cols] block goes to columns [r * cols, (r + 1) * cols).
      gathered.resize(q.numel);
      host.resize(q.numel);
      be->CopyToHost(host.data(), recv.f32(), q.numel * sizeof(float));
      const int64_t rows = p.shape[0], cols = p.shape[1];
      for (int r = 0; r < tp; ++r) {
        for (int64_t i = 0; i < rows; ++i) {
          std::copy_n(host.begin() + (r * rows + i) * cols, cols,
                      gathered.begin() + i * cols * tp + r * cols);
        }
      }
      be->CopyFromHost(to + q.offset, gathered.data(), q.numel * sizeof(float));
    }
  };
  unshard(src.params_data(), whole->params().params_data());
  if (m != nullptr) {
    unshard(m, out_m->f32());
    unshard(v, out_v->f32());
  }
  return whole;
}

Timeline GatherTimeline(const std::vector<BusyInterval>& mine, ParallelContext& ctx, Backend* be) {
  Timeline t;
  if (ctx.coord.dp != 0 || ctx.coord.tp != 0) return t;
  const int pp = ctx.grid.pp(), me = ctx.coord.pp;
  constexpr int kFields = 5;  // start, end, type, microbatch, chunk
  auto encode = [&](const std::vector<BusyInterval>& v) {
    std::vector<double> d;
    for (const BusyInterval& b : v) {
      d.insert(d.end(),
               {b.start, b.end, static_cast<double>(b.action.type),
                static_cast<double>(b.action.microbatch), static_cast<double>(b.action.chunk)});
    }
    return d;
  };
  // Through device buffers: the communicator works on the backend's memory.
  Buffer count_buf(be, sizeof(double));
  if (me != 0) {
    std::vector<double> d = encode(mine);
    const double count = static_cast<double>(mine.size());
    be->CopyFromHost(count_buf.data(), &count, sizeof(double));
    ctx.pp->Send(count_buf.data(), sizeof(double), 0, 10);
    if (!d.empty()) {
      Buffer data(be, d.size() * sizeof(double));
      be->CopyFromHost(data.data(), d.data(), d.size() * sizeof(double));
      ctx.pp->Send(data.data(), d.size() * sizeof(double), 0, 11);
    }
    return t;
  }
  t.stages = pp;
  t.busy.resize(pp);
  t.busy[0] = mine;
  for (int s = 1; s < pp; ++s) {
    double count = 0;
    ctx.pp->Recv(count_buf.data(), sizeof(double), s, 10);
    be->CopyToHost(&count, count_buf.data(), sizeof(double));
    const size_t n = static_cast<size_t>(count) * kFields;
    if (n == 0) continue;
    Buffer data(be, n * sizeof(double));
    ctx.pp->Recv(data.data(), n * sizeof(double), s, 11);
    std::vector<double> d(n);
    be->CopyToHost(d.data(), data.data(), n * sizeof(double));
    for (size_t i = 0; i < n; i += kFields) {
      t.busy[s].push_back(
          BusyInterval{d[i], d[i + 1],
                       Action{static_cast<ActionType>(static_cast<int>(d[i + 2])),
                              static_cast<int>(d[i + 3]), static_cast<int>(d[i + 4])}});
    }
  }
  for (const auto& stage : t.busy) {
    double busy = 0;
    for (const BusyInterval& b : stage) {
      busy += b.end - b.start;
      t.makespan = std::max(t.makespan, b.end);
    }
    t.busy_time.push_back(busy);
  }
  for (double b : t.busy_time) t.idle_time.push_back(t.makespan - b);
  return t;
}

}  // namespace eellm
