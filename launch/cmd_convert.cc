// `eellm convert <mode>`: checkpoint conversions.
//   hf-to-eellm        Hugging Face model directory (config.json + safetensors) -> eellm
//   eellm-to-hf        eellm checkpoint -> Hugging Face directory (safetensors + config.json)
//   megatron-to-eellm  Megatron-LM / EE-LLM checkpoint (torch.save files) -> eellm
//   add-exits          adds exit heads to a checkpoint (EE-Tuning step 1)
//   set-exit-position  moves an exit between post-layer L and pre-layer L+1
//   reshard            writes a checkpoint for another (tp, pp) layout, optimizer state included
// eellm outputs are run directories (<output>/latest, <output>/step_*/) split for --tp x --pp.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "checkpoints/safetensors.h"
#include "engine/core/status.h"
#include "launch/checkpoint_layout.h"
#include "launch/commands.h"
#include "launch/exit_surgery.h"
#include "launch/hf_convert.h"
#include "launch/megatron_convert.h"
#include "launch/model_loader.h"
#include "launch/shared_flags.h"
#include "models/tokenizer.h"

ABSL_FLAG(std::string, mode, "",
          "hf-to-eellm, eellm-to-hf, megatron-to-eellm, add-exits, set-exit-position or reshard "
          "(may also be given "
          "as the first argument: `eellm convert reshard --input ...`)");
ABSL_FLAG(std::string, dtype, "fp32", "eellm-to-hf: safetensors dtype (fp32, bf16 or fp16)");
ABSL_FLAG(int64_t, max_shard_mb, 0,
          "eellm-to-hf: split the safetensors into files of at most this many MB (0 = one file)");
ABSL_FLAG(std::string, exits, "",
          "add-exits: JSON array of exits in the model config's format, e.g. "
          "'[{\"layer\": 6, \"kind\": \"norm\"}]'");
ABSL_FLAG(std::string, init, "copy-final",
          "add-exits: random, copy-final (final norm and LM head), copy-mlp (+ the layer's MLP, "
          "mlp exits) or copy-block (+ the last layer, block exits)");
ABSL_FLAG(std::string, position, "", "set-exit-position: pre or post");

namespace eellm {
namespace {

namespace fs = std::filesystem;

absl::StatusOr<std::string> ReadText(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Writes `whole` as an eellm checkpoint at --output for --tp x --pp.
absl::Status WriteEellm(Model& whole, const CheckpointMeta& meta, const float* m = nullptr,
                        const float* v = nullptr) {
  const std::string out = absl::GetFlag(FLAGS_output);
  ASSIGN_OR_RETURN(std::string dir, WriteCheckpointForLayout(out, meta, whole, m, v,
                                                             std::max(1, absl::GetFlag(FLAGS_tp)),
                                                             std::max(1, absl::GetFlag(FLAGS_pp))));
  std::printf("wrote %s (step %lld, %zu tensors, split for tp %d x pp %d)\n", dir.c_str(),
              static_cast<long long>(meta.step), whole.params().params().size(),
              std::max(1, absl::GetFlag(FLAGS_tp)), std::max(1, absl::GetFlag(FLAGS_pp)));
  // One line, to paste as the "model" section of a run config (train --init-from needs it).
  std::printf("model config: %s\n", nlohmann::json::parse(whole.config().ToJson()).dump().c_str());
  return absl::OkStatus();
}

// A whole model for `c` holding `tensors` (eellm names).
absl::StatusOr<std::unique_ptr<Model>> ModelFrom(const ModelConfig& c, const HostTensorMap& tensors,
                                                 Backend* be) {
  ASSIGN_OR_RETURN(auto model, Model::Create(c, be));
  RETURN_IF_ERROR(HostToParams(tensors, model->params()));
  return model;
}

// Writes `json_text` as tokenizer.json in the output directory and names it in `meta`.
absl::Status KeepTokenizer(const std::string& json_text, CheckpointMeta* meta) {
  const fs::path out = absl::GetFlag(FLAGS_output);
  std::error_code ec;
  fs::create_directories(out, ec);
  std::ofstream f(out / "tokenizer.json", std::ios::binary);
  f << json_text;
  f.close();
  if (!f)
    return absl::InternalError(absl::StrCat("cannot write ", (out / "tokenizer.json").string()));
  meta->attrs["tokenizer"] = fs::absolute(out / "tokenizer.json").string();
  return absl::OkStatus();
}

absl::Status HfToEellmMode(Backend* be) {
  const std::string in = absl::GetFlag(FLAGS_input);
  std::error_code ec;
  if (!fs::exists(in, ec)) return absl::NotFoundError(absl::StrCat("--input ", in, " not found"));
  const fs::path dir = fs::is_directory(in) ? fs::path(in) : fs::path(in).parent_path();
  const std::string config_path = (dir / "config.json").string();
  ASSIGN_OR_RETURN(std::string text, ReadText(config_path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError(config_path + " is not valid JSON");
  auto config = ModelConfigFromHf(j);
  if (!config.ok())
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": ", config.status().message()));
  ASSIGN_OR_RETURN(SafetensorsFile st, ReadSafetensorsModel(in));
  auto tensors = HfToEellm(*config, std::move(st.tensors));
  if (!tensors.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(in, ": ", tensors.status().message()));
  }
  ASSIGN_OR_RETURN(auto model, ModelFrom(*config, *tensors, be));
  CheckpointMeta meta;
  meta.config_json = config->ToJson();
  meta.attrs["source"] = absl::StrCat("huggingface:", fs::absolute(dir).string());
  meta.attrs["tokenizer"] = "byte";
  if (fs::exists(dir / "tokenizer.json")) {  // kept beside the checkpoint, named in it
    ASSIGN_OR_RETURN(std::string tokenizer, ReadText((dir / "tokenizer.json").string()));
    RETURN_IF_ERROR(KeepTokenizer(tokenizer, &meta));
  }
  return WriteEellm(*model, meta);
}

absl::Status MegatronToEellmMode(Backend* be) {
  std::string tok = absl::GetFlag(FLAGS_tokenizer);  // "" when not given
  std::unique_ptr<Tokenizer> tokenizer;
  auto make = [&](const std::string& what) -> absl::Status {
    auto t = MakeTokenizer(tok);
    if (!t.ok()) return absl::InvalidArgumentError(absl::StrCat(what, t.status().message()));
    tokenizer = std::move(*t);
    return absl::OkStatus();
  };
  // byte: convert the weights whatever their vocabulary
  if (!tok.empty() && tok != "byte") RETURN_IF_ERROR(make("--tokenizer: "));
  ASSIGN_OR_RETURN(MegatronModel mm, ReadMegatronCheckpoint(absl::GetFlag(FLAGS_input), true));
  if (tok.empty() && !mm.tokenizer_spec.empty()) {  // the run's own files, found on this machine
    tok = mm.tokenizer_spec;
    RETURN_IF_ERROR(make(absl::StrCat("the run's tokenizer (", mm.tokenizer, "): ")));
    std::printf("tokenizer: the run's %s\n", tok.c_str());
  }
  if (tokenizer != nullptr && tokenizer->vocab_size() > mm.config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tokenizer ", tok, " has ", tokenizer->vocab_size(), " tokens, more than the model's ",
        mm.config.vocab_size, " (padded_vocab_size)"));
  }
  // Megatron's tokenizers are not read: a model named with the byte tokenizer but trained on
  // another would generate garbage, so the choice must be made explicitly.
  if (!mm.tokenizer.empty() && tok.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the Megatron run used ", mm.tokenizer,
        ", whose files are not on this machine; pass them as --tokenizer (a Hugging Face "
        "tokenizer.json, a SentencePiece tokenizer.model, or VOCAB.json,MERGES.txt; or "
        "--tokenizer=byte to convert the weights anyway)"));
  }
  for (const std::string& w : mm.warnings) std::printf("warning: %s\n", w.c_str());
  ASSIGN_OR_RETURN(auto model, ModelFrom(mm.config, mm.tensors, be));
  mm.tensors.clear();
  CheckpointMeta meta;
  meta.config_json = mm.config.ToJson();
  meta.attrs["source"] =
      absl::StrCat("megatron:", fs::absolute(absl::GetFlag(FLAGS_input)).string(), " iteration ",
                   mm.iteration, " (tp ", mm.tp, " x pp ", mm.pp, ")");
  meta.attrs["tokenizer"] = "byte";
  if (!tok.empty() && tok != "byte") {  // a tokenizer.json, or one built from GPT-2's files
    ASSIGN_OR_RETURN(std::string json, TokenizerJson(tok));
    RETURN_IF_ERROR(KeepTokenizer(json, &meta));
  }
  std::printf("Megatron iteration %lld, tp %d x pp %d, %d layers, %zu exits\n",
              static_cast<long long>(mm.iteration), mm.tp, mm.pp, mm.config.num_layers,
              mm.config.exits.size());
  return WriteEellm(*model, meta);
}

absl::Status EellmToHfMode(Backend* be) {
  ASSIGN_OR_RETURN(LoadedModel loaded, LoadModelFromCheckpoint(absl::GetFlag(FLAGS_input), be));
  ASSIGN_OR_RETURN(StDtype dtype, ParseStDtype(absl::GetFlag(FLAGS_dtype)));
  ASSIGN_OR_RETURN(HostTensorMap hf,
                   EellmToHf(loaded.config, ParamsToHost(loaded.model->params())));
  const std::string out = absl::GetFlag(FLAGS_output);
  RETURN_IF_ERROR(WriteSafetensorsModel(out, hf, dtype, absl::GetFlag(FLAGS_max_shard_mb) << 20,
                                        {{"format", "pt"}}));
  nlohmann::json config = HfConfigFromModel(loaded.config);
  config["torch_dtype"] = dtype == StDtype::kF32    ? "float32"
                          : dtype == StDtype::kBF16 ? "bfloat16"
                                                    : "float16";
  {
    std::ofstream f(fs::path(out) / "config.json");
    f << config.dump(2) << "\n";
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", out, "/config.json"));
  }
  const std::string tok =
      loaded.meta.attrs.count("tokenizer") ? loaded.meta.attrs["tokenizer"] : "";
  if (absl::EndsWith(tok, ".json") && fs::exists(tok)) {
    std::error_code ec;
    fs::copy_file(tok, fs::path(out) / "tokenizer.json", fs::copy_options::overwrite_existing, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot copy ", tok, ": ", ec.message()));
  }
  std::printf("wrote %s: %zu tensors (%s), config.json%s\n", out.c_str(), hf.size(),
              StDtypeName(dtype),
              fs::exists(fs::path(out) / "tokenizer.json") ? ", tokenizer.json" : "");
  return absl::OkStatus();
}

// The checkpoint's meta for a derived checkpoint: new config, step 0, attributes kept.
CheckpointMeta Derived(const LoadedModel& loaded, const ModelConfig& c) {
  CheckpointMeta meta = loaded.meta;
  meta.config_json = c.ToJson();
  meta.step = 0;
  meta.attrs.erase("train_state");
  return meta;
}

absl::Status AddExitsMode(Backend* be) {
  ASSIGN_OR_RETURN(LoadedModel loaded, LoadModelFromCheckpoint(absl::GetFlag(FLAGS_input), be));
  // Parse the new exits with the model config's own parser.
  nlohmann::json exits = nlohmann::json::parse(absl::GetFlag(FLAGS_exits), nullptr, false);
  if (exits.is_discarded() || !exits.is_array() || exits.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--exits must be a non-empty JSON array of exits, got '", absl::GetFlag(FLAGS_exits), "'"));
  }
  nlohmann::json probe = nlohmann::json::parse(loaded.config.ToJson());
  probe["exits"] = exits;
  auto parsed = ParseModelConfig(probe.dump());
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--exits: ", parsed.status().message()));
  }
  ASSIGN_OR_RETURN(ExitInit init, ParseExitInit(absl::GetFlag(FLAGS_init)));
  ModelConfig c = loaded.config;
  HostTensorMap tensors = ParamsToHost(loaded.model->params());
  RETURN_IF_ERROR(AddExits(c, tensors, parsed->exits, init, absl::GetFlag(FLAGS_seed)));
  ASSIGN_OR_RETURN(auto model, ModelFrom(c, tensors, be));
  std::printf("added %zu exits (%s); the model now has %zu\n", parsed->exits.size(),
              ExitInitName(init), c.exits.size());
  return WriteEellm(*model, Derived(loaded, c));
}

absl::Status SetExitPositionMode(Backend* be) {
  ASSIGN_OR_RETURN(LoadedModel loaded, LoadModelFromCheckpoint(absl::GetFlag(FLAGS_input), be));
  const std::string pos = absl::GetFlag(FLAGS_position);
  if (pos != "pre" && pos != "post") {
    return absl::InvalidArgumentError(
        absl::StrCat("--position must be pre or post, got '", pos, "'"));
  }
  ModelConfig c = loaded.config;
  RETURN_IF_ERROR(SetExitPosition(c, absl::GetFlag(FLAGS_exit),
                                  pos == "pre" ? ExitPosition::kPre : ExitPosition::kPost));
  HostTensorMap tensors = ParamsToHost(loaded.model->params());
  ASSIGN_OR_RETURN(auto model, ModelFrom(c, tensors, be));
  return WriteEellm(*model, Derived(loaded, c));
}

absl::Status ReshardMode(Backend* be) {
  ASSIGN_OR_RETURN(LoadedModel loaded,
                   LoadModelFromCheckpoint(absl::GetFlag(FLAGS_input), be, true));
  return WriteEellm(*loaded.model, loaded.meta, loaded.adam_m.f32(), loaded.adam_v.f32());
}

}  // namespace

int RunConvertCommand() {
  const std::string mode = absl::GetFlag(FLAGS_mode);
  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
    return 1;
  };
  if (absl::GetFlag(FLAGS_input).empty() || absl::GetFlag(FLAGS_output).empty()) {
    std::fprintf(stderr, "error: --input and --output are required\n");
    return 2;
  }
  auto backend = MakeBackend("cpu");
  if (!backend.ok()) return fail(backend.status());
  absl::Status s;
  if (mode == "hf-to-eellm") {
    s = HfToEellmMode(backend->get());
  } else if (mode == "eellm-to-hf") {
    s = EellmToHfMode(backend->get());
  } else if (mode == "megatron-to-eellm") {
    s = MegatronToEellmMode(backend->get());
  } else if (mode == "add-exits") {
    s = AddExitsMode(backend->get());
  } else if (mode == "set-exit-position") {
    s = SetExitPositionMode(backend->get());
  } else if (mode == "reshard") {
    s = ReshardMode(backend->get());
  } else {
    std::fprintf(stderr,
                 "error: unknown convert mode '%s' (hf-to-eellm, eellm-to-hf, "
                 "megatron-to-eellm, add-exits, set-exit-position, reshard)\n",
                 mode.c_str());
    return 2;
  }
  return s.ok() ? 0 : fail(s);
}

}  // namespace eellm
