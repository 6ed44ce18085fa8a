#include "launch/timeline_gather.h"

#include <algorithm>
#include <vector>

#include "engine/core/status.h"

namespace eellm {

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
