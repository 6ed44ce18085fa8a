// The serving tests' setup: the byte-level test model (tests/models/model_test_util.h) behind a
// GenerationService with its tokenizer, and an ApiServer for it serving a free local port on its
// own thread.
#pragma once

#include <memory>
#include <thread>

#include "gtest/gtest.h"
#include "launch/api_server.h"
#include "launch/generation_service.h"
#include "tests/models/model_test_util.h"

namespace eellm::testing {

struct ServedModel {
  // `slots` sequences at once, each of at most `context` tokens; `kv_tokens` > 0: a KV cache of
  // that many tokens shared by them, with prefix caching.
  explicit ServedModel(int slots, int context = 64, int kv_tokens = 0)
      : model(ByteLevelModel(be.get(), context)),
        gen(model.get(), context, slots, kv_tokens),
        service(&gen) {
    if (kv_tokens > 0) gen.EnablePrefixCaching();  // before any request reaches the service
  }
  std::unique_ptr<Backend> be = Cpu();
  std::unique_ptr<Model> model;
  Generator gen;
  GenerationService service;
  ByteTokenizer tok;
};

// Binds 127.0.0.1 on a free port (`port`; 0 if binding failed, which the test is told) and
// serves it until destroyed.
class LocalServer {
 public:
  explicit LocalServer(ServedModel& s, const ApiDefaults& defaults = ApiDefaults())
      : server_(&s.service, &s.tok, s.model->config(), defaults) {
    auto bound = server_.Bind("127.0.0.1", 0);
    EXPECT_TRUE(bound.ok()) << bound.status();
    if (!bound.ok()) return;
    port = *bound;
    serving_ = std::thread([this] { server_.Serve(); });
  }
  ~LocalServer() {
    server_.Stop();
    if (serving_.joinable()) serving_.join();
  }
  int port = 0;

 private:
  ApiServer server_;
  std::thread serving_;
};

}  // namespace eellm::testing
