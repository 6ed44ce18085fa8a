// Helpers for model tests: tiny configs, deterministic parameter filling, generation requests.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/core/rng.h"
#include "gtest/gtest.h"
#include "models/generator.h"
#include "models/model_config.h"
#include "models/transformer.h"

namespace eellm::testing {

inline std::unique_ptr<Backend> Cpu() {
  auto b = MakeBackend("cpu");
  EXPECT_TRUE(b.ok());
  return std::move(*b);
}

inline ModelConfig TinyConfig(ModelStyle style, int layers = 3) {
  ModelConfig c;
  c.style = style;
  c.vocab_size = 11;
  c.hidden_size = 8;
  c.num_layers = layers;
  c.num_heads = 2;
  c.num_kv_heads = style == ModelStyle::kLlama ? 1 : 2;
  c.ffn_hidden_size = 12;
  c.max_seq_len = 32;
  c.tie_embeddings = style == ModelStyle::kGpt;
  return c;
}

// A 4-layer tiny model (vocab 16) with one exit of each kind: a block exit before layer 1 (it
// reads the embeddings), an MLP exit after layer 2 (tied for GPT) and a norm exit after layer 3
// with temperature 0.7. For the generation tests.
inline ModelConfig ConfigWithExits(ModelStyle style) {
  ModelConfig c = TinyConfig(style, 4);
  c.vocab_size = 16;
  ExitConfig a, b, d;
  a.layer = 1;
  a.kind = ExitKind::kBlock;
  a.position = ExitPosition::kPre;  // depth 0: reads the embeddings
  b.layer = 2;
  b.kind = ExitKind::kMlp;  // post: shares layer 2's attention
  b.tied = style == ModelStyle::kGpt;
  d.layer = 3;
  d.kind = ExitKind::kNorm;
  d.temperature = 0.7f;
  c.exits = {a, b, d};
  return c;
}

// Fills every parameter with N(mean, std) values (norm gains around 1).
inline void FillParams(Model& m, uint64_t seed, float std = 0.3f) {
  Rng rng(seed);
  ParamStore& ps = m.params();
  for (int i = 0; i < static_cast<int>(ps.params().size()); ++i) {
    const ParamInfo& p = ps.params()[i];
    const bool gain = p.name.find("norm.weight") != std::string::npos;
    std::vector<float> h(p.numel);
    for (auto& v : h) v = (gain ? 1.0f : 0.0f) + static_cast<float>(rng.Normal()) * std;
    m.backend()->CopyFromHost(ps.param(i), h.data(), h.size() * sizeof(float));
  }
}

// Copies parameters with equal names from `src` into `dst`.
inline void CopyParamsByName(Model& src, Model& dst) {
  for (int i = 0; i < static_cast<int>(dst.params().params().size()); ++i) {
    int j = src.params().Find(dst.params().params()[i].name);
    if (j < 0) continue;
    std::copy_n(src.params().param(j), dst.params().params()[i].numel, dst.params().param(i));
  }
}

inline std::vector<int32_t> RandomTokens(int n, int vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng.Below(vocab));
  return t;
}

// Four sequences of different prompt lengths, thresholds, sampling and lengths (their prompts,
// 37 tokens, overflow the 32-row work buffers of a capacity-32 generator, so the prefill runs in
// two groups).
inline std::vector<GenerationRequest> MixedRequests(const ModelConfig& c) {
  const int lengths[] = {9, 14, 3, 11}, max_new[] = {20, 12, 17, 20};
  const float thresholds[] = {1.0f, 0.4f, 0.25f, 0.55f};
  std::vector<GenerationRequest> r(4);
  for (int i = 0; i < 4; ++i) {
    r[i].prompt = RandomTokens(lengths[i], c.vocab_size, 60 + i);
    r[i].max_new_tokens = max_new[i];
    r[i].early_exit.threshold = thresholds[i];
  }
  r[1].sampling.temperature = 0.9f;
  r[1].sampling.top_k = 8;
  r[1].sampling.seed = 5;
  r[3].sampling.temperature = 0.7f;
  r[3].sampling.top_p = 0.9f;
  r[3].sampling.seed = 9;
  r[3].early_exit.exit_layers = {1, 3};
  return r;
}

// ConfigWithExits(kLlama) over the byte tokenizer's 258 ids (hidden 16, context `context`),
// filled with fixed values: for the serving tests, which send text.
inline std::unique_ptr<Model> ByteLevelModel(Backend* be, int context = 64) {
  ModelConfig c = ConfigWithExits(ModelStyle::kLlama);
  c.vocab_size = 258;
  c.hidden_size = 16;
  c.max_seq_len = context;
  auto m = *Model::Create(c, be);
  FillParams(*m, 81, 0.6f);
  return m;
}

}  // namespace eellm::testing
