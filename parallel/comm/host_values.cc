#include "parallel/comm/host_values.h"

#include "engine/tensor/tensor.h"

namespace eellm {

void SumOverGroup(Communicator* comm, Backend* be, std::vector<double>& values, ReduceOp op) {
  if (comm->size() == 1) return;
  std::vector<float> host(values.begin(), values.end());
  Buffer buf(be, host.size() * sizeof(float));
  be->CopyFromHost(buf.data(), host.data(), host.size() * sizeof(float));
  comm->AllReduce(buf.f32(), host.size(), op);
  be->CopyToHost(host.data(), buf.data(), host.size() * sizeof(float));
  for (size_t i = 0; i < values.size(); ++i) values[i] = host[i];
}

}  // namespace eellm
