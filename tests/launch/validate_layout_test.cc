// ValidateLayout for interleaved pipelines (virtual_stages): the layer split over pp * v model
// chunks and the microbatch count required by Interleaved1F1B, with errors naming the numbers.
#include <string>

#include "gtest/gtest.h"
#include "launch/trainer.h"

namespace eellm {
namespace {

RunConfig Layout(int layers, int pp, int v, int batch, int micro) {
  RunConfig rc;
  rc.model.num_layers = layers;
  rc.model.num_heads = 4;
  rc.model.num_kv_heads = 4;
  rc.model.vocab_size = 256;
  rc.model.ffn_hidden_size = 64;
  rc.train.pp = pp;
  rc.train.virtual_stages = v;
  rc.train.batch_size = batch;
  rc.train.micro_batch_size = micro;
  return rc;
}

TEST(ValidateLayout, VirtualStages) {
  EXPECT_TRUE(ValidateLayout(Layout(8, 4, 2, 4, 1)).ok());
  EXPECT_TRUE(ValidateLayout(Layout(8, 1, 2, 4, 0)).ok());
  EXPECT_TRUE(ValidateLayout(Layout(4, 2, 1, 4, 0)).ok());  // v = 1: any microbatch count

  absl::Status s = ValidateLayout(Layout(4, 4, 2, 4, 1));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("num_layers 4"), std::string::npos) << s;
  EXPECT_NE(std::string(s.message()).find("= 8"), std::string::npos) << s;

  s = ValidateLayout(Layout(8, 2, 2, 4, 0));  // one microbatch, pp 2
  EXPECT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("1 microbatches"), std::string::npos) << s;
  EXPECT_NE(std::string(s.message()).find("pp 2"), std::string::npos) << s;

  s = ValidateLayout(Layout(8, 2, 0, 4, 1));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("virtual_stages"), std::string::npos) << s;
}

// EE-Tuning without the layers past the deepest exit: the stages split the layers up to it.
TEST(ValidateLayout, SkippingLayersPastExits) {
  RunConfig rc = Layout(8, 4, 1, 4, 1);
  ExitConfig x;
  x.layer = 3;  // post: depth 3
  rc.model.exits = {x};
  rc.train.skip_layers_past_exits = true;
  absl::Status s = ValidateLayout(rc);
  EXPECT_NE(std::string(s.message()).find("needs freeze_backbone"), std::string::npos) << s;

  rc.train.freeze_backbone = true;
  s = ValidateLayout(rc);  // 8 layers split over 4 stages, but 3 do not
  EXPECT_NE(std::string(s.message()).find("the 3 layers up to the deepest exit"), std::string::npos)
      << s;
  EXPECT_NE(std::string(s.message()).find("pp 4"), std::string::npos) << s;
  rc.train.pp = 3;  // 8 layers would not split over 3 stages; the 3 up to the exit do
  EXPECT_TRUE(ValidateLayout(rc).ok()) << ValidateLayout(rc);
  EXPECT_EQ(SplitDepth(rc), 3);

  rc.model.exits[0].layer = 4;
  rc.model.exits[0].position = ExitPosition::kPre;  // reads depth 3 too
  EXPECT_TRUE(ValidateLayout(rc).ok()) << ValidateLayout(rc);
  rc.model.exits[0].layer = 1;  // reads the embedding
  s = ValidateLayout(rc);
  EXPECT_NE(std::string(s.message()).find("no exit after a layer"), std::string::npos) << s;
}

// Sequence parallelism splits each microbatch's rows over tp: they must divide.
TEST(ValidateLayout, SequenceParallelRows) {
  RunConfig rc = Layout(4, 1, 1, 3, 0);  // one microbatch of 3 sequences
  rc.train.tp = 2;
  rc.train.seq_len = 33;
  rc.train.sequence_parallel = true;
  absl::Status s = ValidateLayout(rc);
  EXPECT_NE(std::string(s.message()).find("micro_batch_size 3 x seq_len 33 = 99 rows over tp 2"),
            std::string::npos)
      << s;
  rc.train.seq_len = 32;
  EXPECT_TRUE(ValidateLayout(rc).ok()) << ValidateLayout(rc);
  rc.train.seq_len = 33;
  rc.train.sequence_parallel = false;
  EXPECT_TRUE(ValidateLayout(rc).ok()) << ValidateLayout(rc);
}

}  // namespace
}  // namespace eellm
