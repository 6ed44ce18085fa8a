#include "engine/core/logging.h"

namespace eellm {
namespace {
int g_log_rank = 0;
}
void SetLogRank(int rank) { g_log_rank = rank; }
bool IsLogRank0() { return g_log_rank == 0; }
}  // namespace eellm
