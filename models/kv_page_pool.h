// Which KV pages of a shared pool are free, which sequences hold them, and which hold the K/V of
// which tokens (prefix caching, as vLLM's automatic prefix caching does it).
//
// A page is unused, held (by one or more sequences), or cached: no sequence holds it, but it
// still holds the K/V of known tokens, so a later sequence whose prompt starts with the same
// tokens can hold it again instead of recomputing them. Cached pages count as free: when no page
// is unused, Take gives the least recently released cached page and forgets its tokens.
//
// "Recently" is the caller's clock (Release's `epoch`, e.g. forward passes run), not the order of
// the calls: tensor-parallel ranks release the same pages in the same epochs, though not always in
// the same order (a stop rule ends a sequence on the leader in a pass, on the followers before the
// next one), and must still give the same pages. Within an epoch, pages deeper in their sequences
// go first (a prefix outlives its tails), then lower page numbers.
//
// A registered page is found by its parent (the page before it in its sequence, -1 for the
// first) and its page_tokens token ids. The parent is named by page and generation: a page's
// generation changes whenever it is forgotten, so an entry whose parent page now holds other
// tokens can never be found again (its own page is taken in turn, as the least recently used).
#ifndef EELLM_MODELS_KV_PAGE_POOL_H_
#define EELLM_MODELS_KV_PAGE_POOL_H_

#include <array>
#include <cstdint>
#include <map>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

namespace eellm {

class KvPagePool {
 public:
  static constexpr int kPageTokens = 16;

  explicit KvPagePool(int pages = 0);
  int pages() const { return static_cast<int>(holders_.size()); }
  // Pages Take can give: unused and cached ones.
  int free() const { return static_cast<int>(unused_.size() + cached_.size()); }
  int cached() const { return static_cast<int>(cached_.size()); }
  int holders(int32_t page) const { return holders_.at(page); }

  // A page for a sequence to hold: `preferred` when unused, else the lowest unused page, else the
  // least recently released cached page (forgotten first). -1 when none is free.
  int32_t Take(int32_t preferred = -1);
  // One more sequence holds a registered page (found by Find).
  void Hold(int32_t page);
  // A sequence no longer holds `page`, the `position`-th of its pages, at `epoch`. With no holder
  // left it is unused again, or cached when it is registered.
  void Release(int32_t page, int64_t epoch = 0, int position = 0);

  // The registered page that follows `parent` (-1: a sequence's first page) with `tokens`
  // [kPageTokens], or -1. With `need_exit_kv`, only a page whose block exits' K/V are complete.
  int32_t Find(int32_t parent, const int32_t* tokens, bool need_exit_kv) const;
  // Records that held `page` holds the K/V of `tokens` [kPageTokens] after `parent` (registered,
  // or -1), its block exits' too when `exit_kv`. False (nothing recorded) when another page
  // already holds them (one with its block exits' K/V, when `exit_kv`).
  bool Register(int32_t page, int32_t parent, const int32_t* tokens, bool exit_kv);
  bool registered(int32_t page) const { return keys_.count(page) > 0; }

 private:
  struct Key {
    int32_t parent;
    uint32_t generation;  // the parent's
    std::array<int32_t, kPageTokens> tokens;
    bool operator<(const Key& o) const {
      return std::tie(parent, generation, tokens) < std::tie(o.parent, o.generation, o.tokens);
    }
  };
  struct Entry {
    int32_t page;
    bool exit_kv;
  };
  Key MakeKey(int32_t parent, const int32_t* tokens) const;
  void Forget(int32_t page);  // drops its entry; a new generation

  std::vector<int> holders_;
  std::vector<uint32_t> generation_;
  // When a cached page was released: (epoch, -position, page); the set holds them oldest first.
  using Released = std::tuple<int64_t, int, int32_t>;
  std::vector<Released> released_;
  std::set<int32_t> unused_;
  std::set<Released> cached_;
  std::map<Key, Entry> entries_;
  std::map<int32_t, Key> keys_;  // registered page -> its key
};

}  // namespace eellm

#endif  // EELLM_MODELS_KV_PAGE_POOL_H_
