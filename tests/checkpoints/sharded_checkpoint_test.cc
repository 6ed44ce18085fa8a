// Sharded checkpoints: blocks saved under one (tp, pp) layout load exactly under every other,
// the top-level file's virtual datasets read as whole tensors, and failed or damaged saves are
// detected (the previous checkpoint stays `latest`; errors name the file and the tensor).
// The ranks of a layout are simulated in one process with the save's per-rank steps.
#include "checkpoints/sharded_checkpoint.h"

#include <hdf5.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "gtest/gtest.h"
#include "models/transformer.h"
#include "parallel/comm/self_communicator.h"
#include "tests/models/model_test_util.h"

namespace eellm {
namespace {

namespace fs = std::filesystem;
using testing::Cpu;

ModelConfig Config(ModelStyle style) {
  ModelConfig c = testing::TinyConfig(style, 4);
  c.vocab_size = 12;  // divisible by tp 2
  c.num_kv_heads = 2;
  c.exits = {ExitConfig{}, ExitConfig{}};
  c.exits[0].layer = 1;
  c.exits[0].kind = ExitKind::kNorm;
  c.exits[0].tied = true;
  c.exits[1].layer = 3;
  c.exits[1].kind = ExitKind::kMlp;
  return c;
}

// One simulated rank: its model chunk (initialised from the seed, so every layout holds the same
// global values) and moment arenas derived from the parameters (m = 2p, v = 3p).
struct Rank {
  std::unique_ptr<Model> model;
  std::vector<float> m, v;
  int tp_rank = 0, tp_size = 1, stage = 0;

  ChunkState State(bool for_save) {
    ChunkState s;
    s.params = &model->params();
    s.adam_m = m.data();
    s.adam_v = v.data();
    s.tp_rank = tp_rank;
    s.tp_size = tp_size;
    if (!for_save) return s;
    for (const ParamInfo& p : model->params().params()) {
      const bool replica = p.split_dim < 0 && tp_rank != 0;
      const bool embedding_copy =
          model->word_embedding() >= 0 &&
          p.name == model->params().params()[model->word_embedding()].name && stage != 0;
      if (replica || embedding_copy) s.skip.push_back(p.name);
    }
    return s;
  }
};

std::vector<Rank> MakeLayout(const ModelConfig& c, Backend* be, int tp, int pp, bool init) {
  std::vector<Rank> ranks;
  for (int s = 0; s < pp; ++s) {
    for (int t = 0; t < tp; ++t) {
      Rank r;
      auto m = Model::Create(c, be, StageSpec{s, pp}, TpSpec{t, tp, nullptr});
      EXPECT_TRUE(m.ok()) << m.status();
      r.model = std::move(*m);
      r.tp_rank = t;
      r.tp_size = tp;
      r.stage = s;
      const size_t n = r.model->params().size();
      r.m.assign(n, 0.0f);
      r.v.assign(n, 0.0f);
      if (init) {
        r.model->InitRandom(77);
        const float* p = r.model->params().params_data();
        for (size_t i = 0; i < n; ++i) {
          r.m[i] = 2 * p[i];
          r.v[i] = 3 * p[i];
        }
      }
      ranks.push_back(std::move(r));
    }
  }
  return ranks;
}

CheckpointMeta Meta(int64_t step) {
  CheckpointMeta meta;
  meta.config_json = "{\"test\": true}";
  meta.step = step;
  meta.attrs["train_state"] = absl::StrCat("{\"step\": ", step, "}");
  return meta;
}

// Saves `ranks` as a checkpoint of `root` at `step` (the per-rank steps of a collective save).
absl::StatusOr<std::string> SaveLayout(std::vector<Rank>& ranks, const std::string& root,
                                       int64_t step, int keep_last = 0) {
  const std::string staging = StagingDir(root, step);
  fs::remove_all(staging);
  fs::create_directories(staging);
  for (Rank& r : ranks) {
    RETURN_IF_ERROR(WriteShard(staging, absl::StrCat("tp", r.tp_rank, "_pp", r.stage), Meta(step),
                               {r.State(true)}));
  }
  return PublishCheckpoint(root, Meta(step), keep_last);
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

class ShardedCheckpointTest : public ::testing::TestWithParam<ModelStyle> {
 protected:
  void SetUp() override {
    be_ = Cpu();
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = info->name();
    for (char& ch : name) ch = ch == '/' ? '_' : ch;
    dir_ = (fs::path(::testing::TempDir()) / absl::StrCat("eellm_sharded_", getpid(), "_", name))
               .string();
    fs::remove_all(dir_);
  }
  void TearDown() override {
    EXPECT_EQ(H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL), 0) << "HDF5 objects left open";
    fs::remove_all(dir_);
  }
  std::unique_ptr<Backend> be_;
  std::string dir_;
};

TEST_P(ShardedCheckpointTest, EveryLayoutLoadsWhatAnyLayoutSaved) {
  const ModelConfig c = Config(GetParam());
  const int layouts[][2] = {{1, 1}, {2, 1}, {1, 2}, {2, 2}};  // (tp, pp)
  for (const auto& save : layouts) {
    std::vector<Rank> saved = MakeLayout(c, be_.get(), save[0], save[1], true);
    const std::string root = absl::StrCat(dir_, "/tp", save[0], "_pp", save[1]);
    auto step_dir = SaveLayout(saved, root, 5);
    ASSERT_TRUE(step_dir.ok()) << step_dir.status();
    EXPECT_EQ(*step_dir, root + "/step_00000005");
    EXPECT_EQ(ReadBytes(root + "/latest"), "step_00000005\n");
    EXPECT_FALSE(fs::exists(root + "/step_00000005.tmp"));
    // The file count: one shard per (tp, pp) rank.
    for (int s = 0; s < save[1]; ++s) {
      for (int t = 0; t < save[0]; ++t) {
        EXPECT_TRUE(fs::exists(absl::StrCat(*step_dir, "/shard_tp", t, "_pp", s, ".h5")));
      }
    }
    auto meta = ReadCheckpointMeta(root);
    ASSERT_TRUE(meta.ok()) << meta.status();
    EXPECT_EQ(meta->step, 5);
    EXPECT_EQ(meta->attrs["train_state"], "{\"step\": 5}");
    for (const auto& load : layouts) {
      const std::string what =
          absl::StrCat("saved tp", save[0], " pp", save[1], ", loaded tp", load[0], " pp", load[1]);
      std::vector<Rank> want = MakeLayout(c, be_.get(), load[0], load[1], true);
      std::vector<Rank> got = MakeLayout(c, be_.get(), load[0], load[1], false);
      for (size_t i = 0; i < got.size(); ++i) {
        absl::Status s = LoadCheckpoint(root, {got[i].State(false)});
        ASSERT_TRUE(s.ok()) << what << ": " << s;
        const ParamStore& ps = got[i].model->params();
        for (const ParamInfo& p : ps.params()) {
          const float* a = ps.param(ps.Find(p.name));
          const float* b = want[i].model->params().param(want[i].model->params().Find(p.name));
          ASSERT_EQ(std::memcmp(a, b, p.numel * sizeof(float)), 0) << what << ": " << p.name;
          for (size_t e = 0; e < p.numel; ++e) {
            ASSERT_EQ(got[i].m[p.offset + e], 2 * b[e]) << what << ": m of " << p.name;
            ASSERT_EQ(got[i].v[p.offset + e], 3 * b[e]) << what << ": v of " << p.name;
          }
        }
      }
    }
  }
}

// What h5py does with f["model"][name][()]: the virtual dataset reads as the whole tensor.
TEST_P(ShardedCheckpointTest, TopLevelVirtualDatasetsReadAsWholeTensors) {
  const ModelConfig c = Config(GetParam());
  std::vector<Rank> saved = MakeLayout(c, be_.get(), 2, 2, true);
  ASSERT_TRUE(SaveLayout(saved, dir_, 1).ok());
  std::vector<Rank> whole = MakeLayout(c, be_.get(), 1, 1, true);
  const ParamStore& ps = whole[0].model->params();
  const std::string top = dir_ + "/step_00000001/model.h5";
  hid_t file = H5Fopen(top.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  int checked = 0;
  for (const ParamInfo& p : ps.params()) {
    for (const char* group : {"/model/", "/optimizer/v/"}) {
      hid_t ds = H5Dopen2(file, (group + p.name).c_str(), H5P_DEFAULT);
      ASSERT_GE(ds, 0) << p.name;
      std::vector<float> data(p.numel);
      EXPECT_GE(H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()), 0);
      H5Dclose(ds);
      const float scale = group[1] == 'o' ? 3.0f : 1.0f;
      for (size_t e = 0; e < p.numel; ++e) {
        ASSERT_EQ(data[e], scale * ps.param(ps.Find(p.name))[e]) << group << p.name;
      }
      ++checked;
    }
  }
  H5Fclose(file);
  EXPECT_EQ(checked, 2 * static_cast<int>(ps.params().size()));
  auto list = ListCheckpointTensors(dir_);
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(list->size(), ps.params().size());
}

INSTANTIATE_TEST_SUITE_P(Styles, ShardedCheckpointTest,
                         ::testing::Values(ModelStyle::kGpt, ModelStyle::kLlama));

// A frozen model's optimizer holds moments for the trainable tail of the arena alone
// (ParamStore::KeepGradientsFrom): its checkpoints save the frozen tensors' moments as zeros,
// and loading one fills the tail's moments and leaves the frozen tensors' stored moments out.
TEST(FrozenCheckpointTest, FrozenTensorsSaveZeroMomentsAndLoadNone) {
  const std::string dir = fs::temp_directory_path() / absl::StrCat("eellm_frozen_", getpid());
  ModelConfig c = Config(ModelStyle::kGpt);
  c.vocab_size = 2000;  // an embedding past the first kArenaMultiple elements
  auto be = Cpu();
  auto model = Model::Create(c, be.get());
  ASSERT_TRUE(model.ok()) << model.status();
  ParamStore& ps = (*model)->params();
  (*model)->InitRandom(3);
  for (ParamInfo& p : ps.mutable_params()) p.trainable = Model::IsExitTensor(p.name);
  ps.KeepGradientsFrom(ps.TrainableFrom());
  ASSERT_GT(ps.grad_lo(), 0u);
  std::vector<float> m(ps.grad_size()), v(ps.grad_size());
  for (size_t i = 0; i < m.size(); ++i) m[i] = 1.0f + i, v[i] = 2.0f + i;
  CheckpointMeta meta;
  meta.config_json = "{}";
  ASSERT_TRUE(SaveCheckpoint(dir + "/f.h5", ps, meta, m.data(), v.data()).ok());
  // Read back into whole arenas (every tensor trainable): zeros exactly for the frozen tensors.
  auto whole = Model::Create(c, be.get());
  ASSERT_TRUE(whole.ok());
  ParamStore& ws = (*whole)->params();
  std::vector<float> wm(ws.padded_size(), -1.0f), wv(ws.padded_size(), -1.0f);
  ASSERT_TRUE(LoadCheckpoint(dir + "/f.h5", ws, wm.data(), wv.data()).ok());
  int frozen = 0;
  for (const ParamInfo& p : ws.params()) {
    const bool exit = Model::IsExitTensor(p.name);
    frozen += !exit;
    for (size_t i = 0; i < p.numel; ++i) {
      const float want = exit ? m[p.offset - ps.grad_lo() + i] : 0.0f;
      ASSERT_EQ(wm[p.offset + i], want) << p.name << " element " << i;
    }
  }
  EXPECT_GT(frozen, 5);
  // Loaded back into the frozen layout: the tail's moments return, nothing below grad_lo().
  std::vector<float> bm(ps.grad_size(), -1.0f), bv(ps.grad_size(), -1.0f);
  ASSERT_TRUE(LoadCheckpoint(dir + "/f.h5", ps, bm.data(), bv.data()).ok());
  for (const ParamInfo& p : ps.params()) {
    if (!p.trainable) continue;
    for (size_t i = 0; i < p.numel; ++i) {
      ASSERT_EQ(bv[p.offset - ps.grad_lo() + i], v[p.offset - ps.grad_lo() + i]) << p.name;
    }
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
}

class ShardedFaultTest : public ShardedCheckpointTest {};

// A save that dies after some shards leaves the previous checkpoint as `latest`, loadable.
TEST_F(ShardedFaultTest, FailedSaveKeepsThePreviousCheckpoint) {
  const ModelConfig c = Config(ModelStyle::kLlama);
  std::vector<Rank> ranks = MakeLayout(c, be_.get(), 1, 1, true);
  SelfCommunicator world;
  auto first = SaveShardedCheckpoint(dir_, Meta(1), {ranks[0].State(true)}, "tp0_pp0", world);
  ASSERT_TRUE(first.ok()) << first.status();
  ShardedSaveOptions fail;
  fail.fail_after_tensors = 3;
  auto second =
      SaveShardedCheckpoint(dir_, Meta(2), {ranks[0].State(true)}, "tp0_pp0", world, fail);
  ASSERT_FALSE(second.ok());
  EXPECT_TRUE(absl::StrContains(second.status().message(), "after writing 3 tensors"))
      << second.status();
  EXPECT_EQ(ReadBytes(dir_ + "/latest"), "step_00000001\n");
  EXPECT_FALSE(fs::exists(dir_ + "/step_00000002"));
  EXPECT_FALSE(fs::exists(dir_ + "/step_00000002.tmp"));
  // Likewise when the shards a save adds (write_more) fail after one was written.
  ShardedSaveOptions more;
  more.write_more = [&](const std::string& staging) {
    RETURN_IF_ERROR(WriteShard(staging, "extra", Meta(2), {ranks[0].State(true)}));
    return absl::DataLossError("extra shard 2 failed");
  };
  second = SaveShardedCheckpoint(dir_, Meta(2), {ranks[0].State(true)}, "tp0_pp0", world, more);
  EXPECT_EQ(second.status().message(), "extra shard 2 failed");
  EXPECT_EQ(ReadBytes(dir_ + "/latest"), "step_00000001\n");
  EXPECT_FALSE(fs::exists(dir_ + "/step_00000002"));
  EXPECT_FALSE(fs::exists(dir_ + "/step_00000002.tmp"));
  std::vector<Rank> got = MakeLayout(c, be_.get(), 1, 1, false);
  ASSERT_TRUE(LoadCheckpoint(dir_, {got[0].State(false)}).ok());
  EXPECT_EQ(
      std::memcmp(got[0].model->params().params_data(), ranks[0].model->params().params_data(),
                  ranks[0].model->params().size() * sizeof(float)),
      0);
  // A multi-shard layout where one rank's write fails midway (the others completed theirs).
  std::vector<Rank> split = MakeLayout(c, be_.get(), 2, 2, true);
  const std::string staging = StagingDir(dir_, 3);
  fs::create_directories(staging);
  for (size_t i = 0; i < split.size(); ++i) {
    absl::Status s =
        WriteShard(staging, absl::StrCat("r", i), Meta(3), {split[i].State(true)}, i == 2 ? 5 : -1);
    EXPECT_EQ(s.ok(), i != 2) << s;
  }
  // Publishing without the failed shard is refused, naming what is missing.
  auto published = PublishCheckpoint(dir_, Meta(3), 0);
  ASSERT_FALSE(published.ok());
  EXPECT_TRUE(absl::StrContains(published.status().message(), "a shard is missing"))
      << published.status();
  EXPECT_EQ(ReadBytes(dir_ + "/latest"), "step_00000001\n");
}

TEST_F(ShardedFaultTest, KeepsTheLastKStepDirectories) {
  const ModelConfig c = Config(ModelStyle::kGpt);
  std::vector<Rank> ranks = MakeLayout(c, be_.get(), 2, 1, true);
  for (int step = 1; step <= 4; ++step) ASSERT_TRUE(SaveLayout(ranks, dir_, step, 2).ok());
  EXPECT_FALSE(fs::exists(dir_ + "/step_00000001"));
  EXPECT_FALSE(fs::exists(dir_ + "/step_00000002"));
  EXPECT_TRUE(fs::exists(dir_ + "/step_00000003/model.h5"));
  EXPECT_TRUE(fs::exists(dir_ + "/step_00000004/model.h5"));
  EXPECT_EQ(ReadBytes(dir_ + "/latest"), "step_00000004\n");
  // Each form of path resolves to the same top-level file.
  for (const std::string& p : {dir_, dir_ + "/step_00000004", dir_ + "/step_00000004/model.h5"}) {
    auto top = ResolveCheckpoint(p);
    ASSERT_TRUE(top.ok()) << top.status();
    EXPECT_EQ(*top, dir_ + "/step_00000004/model.h5");
  }
}

TEST_F(ShardedFaultTest, DamagedCheckpointsNameTheFileAndTensor) {
  const ModelConfig c = Config(ModelStyle::kLlama);
  std::vector<Rank> ranks = MakeLayout(c, be_.get(), 2, 2, true);
  ASSERT_TRUE(SaveLayout(ranks, dir_, 7).ok());
  const std::string step = dir_ + "/step_00000007";
  auto load_whole = [&](const ModelConfig& cfg) {
    std::vector<Rank> got = MakeLayout(cfg, be_.get(), 1, 1, false);
    return LoadCheckpoint(dir_, {got[0].State(false)});
  };
  ASSERT_TRUE(load_whole(c).ok());

  // A flipped byte in a block's data: checksum mismatch naming the shard file and tensor.
  const std::string shard = step + "/shard_tp1_pp0.h5";
  const std::string tensor = "layers.0.attn.wq.weight";
  const std::string saved_bytes = ReadBytes(shard);
  {
    hid_t file = H5Fopen(shard.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t ds = H5Dopen2(file, ("/model/" + tensor).c_str(), H5P_DEFAULT);
    const haddr_t offset = H5Dget_offset(ds);
    H5Dclose(ds);
    H5Fclose(file);
    ASSERT_NE(offset, HADDR_UNDEF);
    std::string bytes = saved_bytes;
    bytes[offset + 5] ^= 0x10;
    WriteBytes(shard, bytes);
  }
  absl::Status s = load_whole(c);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "checksum mismatch")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), shard)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), tensor)) << s;

  // A truncated shard.
  WriteBytes(shard, saved_bytes.substr(0, saved_bytes.size() / 2));
  s = load_whole(c);
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.message(), shard)) << s;

  // A missing shard file.
  fs::remove(shard);
  s = load_whole(c);
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.message(), shard)) << s;
  WriteBytes(shard, saved_bytes);
  ASSERT_TRUE(load_whole(c).ok());

  // A model whose shapes differ: the tensor and both shapes are named.
  ModelConfig wider = c;
  wider.ffn_hidden_size = 16;
  s = load_whole(wider);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "layers.0.mlp.fc1.weight")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "[12, 8]")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "[16, 8]")) << s;

  // A tensor the checkpoint lacks (a model with one more exit).
  ModelConfig more = c;
  more.exits.push_back(ExitConfig{});
  more.exits.back().layer = 4;
  more.exits.back().position = ExitPosition::kPre;
  s = load_whole(more);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "exits.2.norm.weight")) << s;

  // `latest` naming a step directory that does not exist.
  WriteBytes(dir_ + "/latest", "step_00000009\n");
  s = load_whole(c);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "step_00000009")) << s;
}

}  // namespace
}  // namespace eellm
