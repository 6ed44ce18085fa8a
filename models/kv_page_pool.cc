#include "models/kv_page_pool.h"

#include <algorithm>

#include "engine/core/status.h"

namespace eellm {

KvPagePool::KvPagePool(int pages) : holders_(pages, 0), generation_(pages, 0), released_(pages) {
  for (int p = 0; p < pages; ++p) unused_.insert(unused_.end(), p);
}

int32_t KvPagePool::Take(int32_t preferred) {
  int32_t page = -1;
  if (auto it = unused_.find(preferred); it != unused_.end()) {
    page = *it;
    unused_.erase(it);
  } else if (!unused_.empty()) {
    page = *unused_.begin();
    unused_.erase(unused_.begin());
  } else if (!cached_.empty()) {
    page = std::get<2>(*cached_.begin());
    cached_.erase(cached_.begin());
    Forget(page);
  } else {
    return -1;
  }
  holders_[page] = 1;
  return page;
}

void KvPagePool::Hold(int32_t page) {
  EE_CHECK(registered(page), "KV page ", page, " is not registered: only cached pages are shared");
  if (holders_[page]++ == 0) cached_.erase(released_[page]);
}

void KvPagePool::Release(int32_t page, int64_t epoch, int position) {
  EE_CHECK(page >= 0 && page < pages() && holders_[page] > 0, "KV page ", page,
           " released, but no sequence holds it");
  if (--holders_[page] > 0) return;
  if (registered(page)) {
    released_[page] = {epoch, -position, page};
    cached_.insert(released_[page]);
  } else {
    unused_.insert(page);
  }
}

KvPagePool::Key KvPagePool::MakeKey(int32_t parent, const int32_t* tokens) const {
  Key k;
  k.parent = parent;
  k.generation = parent >= 0 ? generation_.at(parent) : 0;
  std::copy_n(tokens, kPageTokens, k.tokens.begin());
  return k;
}

int32_t KvPagePool::Find(int32_t parent, const int32_t* tokens, bool need_exit_kv) const {
  if (parent >= 0 && !registered(parent)) return -1;
  auto it = entries_.find(MakeKey(parent, tokens));
  if (it == entries_.end() || (need_exit_kv && !it->second.exit_kv)) return -1;
  return it->second.page;
}

bool KvPagePool::Register(int32_t page, int32_t parent, const int32_t* tokens, bool exit_kv) {
  EE_CHECK(page >= 0 && page < pages() && holders_[page] > 0 && !registered(page), "KV page ", page,
           " registered while not held, or again");
  if (parent >= 0 && !registered(parent)) return false;
  const Key key = MakeKey(parent, tokens);
  auto it = entries_.find(key);
  if (it != entries_.end()) {
    if (!exit_kv || it->second.exit_kv) return false;
    // This page also holds its block exits' K/V: it replaces the one that does not.
    const int32_t old = it->second.page;
    Forget(old);
    if (holders_[old] == 0) {
      cached_.erase(released_[old]);
      unused_.insert(old);
    }
  }
  entries_[key] = {page, exit_kv};
  keys_[page] = key;
  return true;
}

void KvPagePool::Forget(int32_t page) {
  auto it = keys_.find(page);
  if (it == keys_.end()) return;
  entries_.erase(it->second);
  keys_.erase(it);
  ++generation_[page];
}

}  // namespace eellm
