// A sequence's KV cache in pages (vLLM's paged KV cache): the cache of every layer is one pool
// of rows shared by all sequences, handed out in pages of page_tokens rows; a sequence's token
// at position j lies in row pages[j / page_tokens] * page_tokens + j % page_tokens of each pool.
// Its pages need not be adjacent, so a sequence grows by whole pages wherever they are free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace eellm {

struct KvPageTable {
  const int32_t* host = nullptr;    // [pages]: each page's index in the pool
  const int32_t* device = nullptr;  // the same in backend memory (what device kernels read)
  int page_tokens = 0;              // rows per page: a power of two
  int count = 0;                    // pages in the table

  int tokens() const { return count * page_tokens; }  // positions the pages hold

  int64_t Row(int pos) const {
    return int64_t{host[pos / page_tokens]} * page_tokens + pos % page_tokens;
  }
};

// One sequence's rows in an inference pass over several sequences (Backend::PagedAttentionPass):
// rows [row, row + rows) of the pass are its positions q_offset .. q_offset + rows - 1, cached in
// `pages`.
struct PagedRows {
  const KvPageTable* pages = nullptr;
  int row = 0;
  int rows = 0;
  int q_offset = 0;
};

// Positions [pos, pos + count) that lie in consecutive pool rows [row, row + count).
struct PageRun {
  int pos = 0;
  int64_t row = 0;
  int count = 0;
};

// Positions [first, first + count) of `t` as runs of consecutive rows (adjacent pages merge).
inline std::vector<PageRun> PageRuns(const KvPageTable& t, int first, int count) {
  std::vector<PageRun> runs;
  for (int pos = first; pos < first + count;) {
    const int in_page = std::min(t.page_tokens - pos % t.page_tokens, first + count - pos);
    const int64_t row = t.Row(pos);
    if (!runs.empty() && runs.back().row + runs.back().count == row) {
      runs.back().count += in_page;
    } else {
      runs.push_back({pos, row, in_page});
    }
    pos += in_page;
  }
  return runs;
}

}  // namespace eellm
