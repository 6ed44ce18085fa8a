// The AdamW optimizer over a ParamStore against a scalar reference: decoupled weight decay only
// where the tensor asks for it, frozen tensors untouched, global-norm clipping, the alignment
// padding between tensors left zero, and a shard [lo, hi) updating exactly its part.
#include "engine/optim/adamw.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "engine/backend.h"
#include "engine/core/rng.h"
#include "gtest/gtest.h"

namespace eellm {
namespace {

struct Spec {
  const char* name;
  Shape shape;
  bool decay;
  bool trainable;
};

std::unique_ptr<ParamStore> MakeStore(Backend* be) {
  const Spec specs[] = {{"w1", {3, 5}, true, true},   {"b1", {7}, false, true},
                        {"frozen", {9}, true, false}, {"g", {5}, false, true},
                        {"w2", {4, 4}, true, true},   {"w3", {33}, true, true}};
  auto ps = std::make_unique<ParamStore>();
  for (const Spec& s : specs) ps->Add(s.name, s.shape, s.decay);
  for (ParamInfo& p : ps->mutable_params()) p.trainable = p.name != "frozen";
  ps->Allocate(be);
  Rng rng(5);
  for (const ParamInfo& p : ps->params()) {
    for (size_t i = 0; i < p.numel; ++i) {
      ps->params_data()[p.offset + i] = static_cast<float>(rng.Normal());
      ps->grads_data()[p.offset + i] = static_cast<float>(rng.Normal()) * 3.0f;
    }
  }
  return ps;
}

TEST(AdamWTest, MatchesScalarReferenceWithDecayFrozenClippingAndPadding) {
  auto be = MakeBackend("cpu");
  ASSERT_TRUE(be.ok());
  auto ps = MakeStore(be->get());
  const std::vector<float> p0(ps->params_data(), ps->params_data() + ps->padded_size());
  const std::vector<float> g0(ps->grads_data(), ps->grads_data() + ps->padded_size());
  AdamWConfig c;
  c.grad_clip = 1.0f;
  AdamW opt(ps.get(), c);
  const float lr = 0.01f;
  const double norm = opt.Step(lr);
  // Reference: norm over trainable tensors, clip, one AdamW step from zero moments.
  double sq = 0;
  for (const ParamInfo& p : ps->params()) {
    if (!p.trainable) continue;
    for (size_t i = 0; i < p.numel; ++i) sq += double{g0[p.offset + i]} * g0[p.offset + i];
  }
  EXPECT_NEAR(norm, std::sqrt(sq), 1e-9 * std::sqrt(sq));
  const float scale = static_cast<float>(c.grad_clip / std::sqrt(sq));
  std::vector<bool> in_tensor(ps->padded_size(), false);
  for (const ParamInfo& p : ps->params()) {
    for (size_t i = 0; i < p.numel; ++i) {
      const size_t k = p.offset + i;
      in_tensor[k] = true;
      if (!p.trainable) {
        EXPECT_EQ(ps->params_data()[k], p0[k]) << p.name << " is frozen";
        continue;
      }
      const float g = g0[k] * scale;
      const float m = (1 - c.beta1) * g, v = (1 - c.beta2) * g * g;
      const float m_hat = m / (1 - c.beta1), v_hat = v / (1 - c.beta2);
      const float wd = p.weight_decay ? c.weight_decay : 0.0f;
      const float want = p0[k] - lr * (m_hat / (std::sqrt(v_hat) + c.eps) + wd * p0[k]);
      EXPECT_NEAR(ps->params_data()[k], want, 1e-6f) << p.name << "[" << i << "]";
    }
  }
  for (size_t k = 0; k < ps->padded_size(); ++k) {
    if (in_tensor[k]) continue;
    EXPECT_EQ(ps->params_data()[k], 0.0f) << "padding element " << k;
    EXPECT_EQ(opt.m()[k], 0.0f) << "padding element " << k;
  }
}

TEST(AdamWTest, ShardsTogetherEqualTheWholeUpdate) {
  auto be = MakeBackend("cpu");
  ASSERT_TRUE(be.ok());
  auto whole = MakeStore(be->get());
  AdamW full(whole.get(), AdamWConfig{});
  full.Update(0.01f, 0.5f);
  auto split = MakeStore(be->get());
  const size_t cut = 21;  // inside tensor b1
  AdamW lo(split.get(), AdamWConfig{}, 0, cut), hi(split.get(), AdamWConfig{}, cut);
  lo.Update(0.01f, 0.5f);
  hi.Update(0.01f, 0.5f);
  for (size_t k = 0; k < whole->size(); ++k) {
    EXPECT_EQ(split->params_data()[k], whole->params_data()[k]) << "element " << k;
  }
  for (size_t k = 0; k < cut; ++k) EXPECT_EQ(lo.v()[k], full.v()[k]);
  for (size_t k = cut; k < whole->size(); ++k) EXPECT_EQ(hi.v()[k - cut], full.v()[k]);
}

// A frozen backbone followed by trainable tensors: with the gradients (and so the moments) kept
// only from TrainableFrom() on, frozen tensors have none, and a step updates the trainable
// tensors exactly as with whole arenas.
TEST(AdamWTest, GradientsKeptForTheTrainableTailUpdateTheSame) {
  auto be = MakeBackend("cpu");
  ASSERT_TRUE(be.ok());
  auto make = [&](bool keep_tail) {
    auto ps = std::make_unique<ParamStore>();
    ps->Add("backbone", {20000}, true);  // past the first kArenaMultiple (13,440) elements
    ps->Add("exit.w", {30, 11}, true);
    ps->Add("exit.g", {11}, false);
    ps->mutable_params()[0].trainable = false;
    ps->Allocate(be->get());
    Rng rng(9);
    for (size_t i = 0; i < ps->size(); ++i) ps->params_data()[i] = static_cast<float>(rng.Normal());
    if (keep_tail) ps->KeepGradientsFrom(ps->TrainableFrom());
    for (int j = 1; j < 3; ++j) {
      for (size_t i = 0; i < ps->params()[j].numel; ++i) {
        ps->grad(j)[i] = static_cast<float>(std::sin(1.0 + i + 100 * j));
      }
    }
    return ps;
  };
  auto whole = make(false), tail = make(true);
  EXPECT_EQ(whole->grad_lo(), 0u);
  EXPECT_EQ(tail->grad_lo(), ParamStore::kArenaMultiple);
  EXPECT_EQ(tail->grad_size(), whole->padded_size() - ParamStore::kArenaMultiple);
  EXPECT_EQ(tail->grad(0), nullptr);
  EXPECT_EQ(tail->grad(1), tail->grad_at(tail->params()[1].offset));
  EXPECT_DEATH(tail->grad_at(100), "has no gradient");
  AdamW a(whole.get(), AdamWConfig{}), b(tail.get(), AdamWConfig{});
  EXPECT_EQ(b.lo(), tail->grad_lo());
  for (int step = 0; step < 2; ++step) {
    EXPECT_EQ(a.Step(0.01f), b.Step(0.01f));
  }
  EXPECT_EQ(std::memcmp(whole->params_data(), tail->params_data(), whole->size() * sizeof(float)),
            0);
  const size_t lo = tail->grad_lo();
  EXPECT_EQ(std::memcmp(a.m() + lo, b.m(), tail->grad_size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(a.v() + lo, b.v(), tail->grad_size() * sizeof(float)), 0);
  // Every tensor trainable: nothing to drop (never an empty arena).
  auto all = std::make_unique<ParamStore>();
  all->Add("w", {20000}, true);
  all->Allocate(be->get());
  EXPECT_EQ(all->TrainableFrom(), 0u);
  for (ParamInfo& p : all->mutable_params()) p.trainable = false;
  EXPECT_EQ(all->TrainableFrom(), all->padded_size() - ParamStore::kArenaMultiple);
}

}  // namespace
}  // namespace eellm
