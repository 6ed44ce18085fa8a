// Test ground truth for generation: every head's logits at every position from one training-path
// forward over a whole sequence, and the check that a generated sequence's tokens came from the
// heads the early-exit rule picks there, with those heads' log-probabilities.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "models/generator.h"
#include "models/layers.h"
#include "models/sampler.h"
#include "models/transformer.h"

namespace eellm {
namespace testing {

struct FullPass {
  std::vector<std::vector<float>> final_logits;              // [pos][vocab]
  std::vector<std::vector<std::vector<float>>> exit_logits;  // [exit][pos][vocab]
  std::vector<std::vector<float>> k, v;                      // per layer [pos * hkv * d]
};

// Training-path forward over one sequence: every head's logits at every position.
inline FullPass RunFull(Model& m, const std::vector<int32_t>& ids) {
  const ModelConfig& c = m.config();
  const int t = static_cast<int>(ids.size()), ch = c.hidden_size, v = c.vocab_size;
  Arena a(m.backend());
  int32_t* dids = a.Ints(t);
  int32_t* pos = a.Ints(t);
  std::copy(ids.begin(), ids.end(), dids);
  for (int i = 0; i < t; ++i) pos[i] = i;
  std::vector<float*> depth_hidden(c.num_layers + 1);
  depth_hidden[0] = a.Floats(t * ch);
  m.Embed(depth_hidden[0], dids, pos, t);
  std::vector<BlockActs> acts;
  FullPass f;
  for (int l = 0; l < c.num_layers; ++l) {
    acts.push_back(MakeBlockActs(a, c, t, /*training=*/true));
    BlockForward(m.ctx(), m.layer(l), acts[l], depth_hidden[l], pos, 1, t, nullptr);
    depth_hidden[l + 1] = acts[l].out;
    // K and V gathered dense from their rows (the parts of fused q, k, v rows, or dense).
    const int kv_cols = c.num_kv_heads * c.head_dim(), stride = acts[l].attn.kv_stride;
    f.k.emplace_back();
    f.v.emplace_back();
    for (int p = 0; p < t; ++p) {
      const float* k = acts[l].attn.k.f32() + static_cast<size_t>(p) * stride;
      const float* v = acts[l].attn.v.f32() + static_cast<size_t>(p) * stride;
      f.k.back().insert(f.k.back().end(), k, k + kv_cols);
      f.v.back().insert(f.v.back().end(), v, v + kv_cols);
    }
  }
  float* logits = a.Floats(t * v);
  auto rows = [&](std::vector<std::vector<float>>& out) {
    for (int p = 0; p < t; ++p) out.emplace_back(logits + p * v, logits + (p + 1) * v);
  };
  NormActs fn = MakeNormActs(a, t, ch);
  m.Project(logits, m.FinalHidden(fn, depth_hidden[c.num_layers], t), -1, t);
  rows(f.final_logits);
  for (size_t i = 0; i < c.exits.size(); ++i) {
    const ExitConfig& x = c.exits[i];
    ExitActs ea = m.MakeExitActs(a, i, t, /*training=*/true);
    const float* in = (x.kind == ExitKind::kMlp && x.position == ExitPosition::kPost)
                          ? acts[x.layer - 1].h_attn
                          : depth_hidden[x.depth()];
    m.Project(logits, m.ExitHidden(i, ea, in, pos, 1, t, nullptr), i, t);
    f.exit_logits.emplace_back();
    rows(f.exit_logits.back());
  }
  return f;
}

inline double MaxAbsDiff(const float* a, const float* b, size_t n) {
  double d = 0;
  for (size_t i = 0; i < n; ++i) d = std::max(d, static_cast<double>(std::fabs(a[i] - b[i])));
  return d;
}

inline double MaxAbs(const std::vector<float>& a) {
  double m = 0;
  for (float x : a) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

// Sequence `seq`'s cached K and V (read through its KV pages) equal a full pass's, every layer,
// within `tolerance` relative to the layer's largest |K| or |V| (at least 1). Decode steps and
// the full pass multiply matrices of different shapes, which BLAS blocks differently: fp32
// rounding then differs by about 1e-6 of the values per layer, more on deeper layers.
inline void ExpectCacheMatches(const Generator& g, int seq, const FullPass& full,
                               double tolerance = 1e-5) {
  for (size_t l = 0; l < full.k.size(); ++l) {
    const std::vector<float> k = g.KvToHost(static_cast<int>(l), seq, false);
    const std::vector<float> v = g.KvToHost(static_cast<int>(l), seq, true);
    ASSERT_EQ(k.size(), full.k[l].size()) << "layer " << l;
    const double k_scale = std::max(1.0, MaxAbs(full.k[l]));
    const double v_scale = std::max(1.0, MaxAbs(full.v[l]));
    EXPECT_LT(MaxAbsDiff(k.data(), full.k[l].data(), k.size()), tolerance * k_scale)
        << "seq " << seq << " layer " << l << " max |K| " << k_scale;
    EXPECT_LT(MaxAbsDiff(v.data(), full.v[l].data(), v.size()), tolerance * v_scale)
        << "seq " << seq << " layer " << l << " max |V| " << v_scale;
  }
}

// Ground truth for a generated sequence: each token's log-probability is that of the head that
// produced it in a full pass over prompt + generated tokens, and that head is the first allowed
// exit whose full-pass max probability reaches the threshold (the final head if none does).
inline void ExpectMatchesFullPass(Model& m, const GenerationRequest& q, const GenerationResult& g) {
  const ModelConfig& c = m.config();
  std::vector<int32_t> all = q.prompt;
  all.insert(all.end(), g.tokens.begin(), g.tokens.end());
  FullPass full = RunFull(m, all);
  for (size_t t = 0; t < g.tokens.size(); ++t) {
    const int p = static_cast<int>(q.prompt.size() + t) - 1;
    const int e = g.exit_index[t];
    const auto& ref = e < 0 ? full.final_logits[p] : full.exit_logits[e][p];
    EXPECT_NEAR(g.logprobs[t], LogProbability(ref.data(), c.vocab_size, g.tokens[t]), 2e-4)
        << "token " << t << " exit " << e;
    int want = -1;
    bool close_call = false;  // a max probability within rounding of the threshold
    // A prefill that scores its prompt checks no exit: the final head decides the first token.
    const bool exits_checked = q.early_exit.threshold < 1 && !(t == 0 && q.prompt_logprobs);
    for (size_t x = 0; x < c.exits.size() && exits_checked; ++x) {
      const auto& allowed = q.early_exit.exit_layers;
      if (!allowed.empty() &&
          std::find(allowed.begin(), allowed.end(), c.exits[x].layer) == allowed.end()) {
        continue;
      }
      const float mp =
          MaxProbability(full.exit_logits[x][p].data(), c.vocab_size, c.exits[x].temperature);
      close_call |= std::fabs(mp - q.early_exit.threshold) < 1e-4;
      if (mp >= q.early_exit.threshold) {
        want = static_cast<int>(x);
        break;
      }
    }
    if (!close_call) EXPECT_EQ(e, want) << "token " << t;
    if (e != want) return;  // the sequences differ from here on
  }
}

}  // namespace testing
}  // namespace eellm
