#include "launch/exit_surgery.h"

#include <algorithm>
#include <map>
#include <string>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "engine/core/rng.h"
#include "engine/core/status.h"
#include "launch/hf_convert.h"

namespace eellm {
namespace {

const char* PositionName(ExitPosition p) { return p == ExitPosition::kPost ? "post" : "pre"; }

std::string Describe(const ExitConfig& x) {
  return absl::StrCat(ExitKindName(x.kind), " exit at ", PositionName(x.position), "-layer ",
                      x.layer);
}

// FNV-1a of a tensor name (seeds its random values, as Model::InitRandom does).
uint64_t NameHash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

HostTensor RandomTensor(const std::string& name, const Shape& shape, uint64_t seed) {
  HostTensor t{shape, std::vector<float>(static_cast<size_t>(NumElements(shape)), 0.0f)};
  if (absl::EndsWith(name, "norm.weight")) {
    std::fill(t.data.begin(), t.data.end(), 1.0f);
  } else if (!absl::EndsWith(name, ".bias")) {
    Rng rng(seed ^ NameHash(name));
    for (float& v : t.data) v = static_cast<float>(rng.Normal()) * 0.02f;
  }
  return t;
}

// "exits.{k}.rest" -> {k, "rest"}; k = -1 for other names.
std::pair<int, std::string> SplitExitName(const std::string& name) {
  if (!absl::StartsWith(name, "exits.")) return {-1, ""};
  const size_t dot = name.find('.', 6);
  int k = -1;
  if (dot == std::string::npos || !absl::SimpleAtoi(name.substr(6, dot - 6), &k)) return {-1, ""};
  return {k, name.substr(dot + 1)};
}

absl::Status CheckTensorsMatch(const ModelConfig& c, const HostTensorMap& tensors) {
  std::map<std::string, Shape> shapes;
  for (auto& [name, shape] : EellmParamShapes(c)) {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", name, "\" of the model is missing"));
    }
    if (it->second.shape != shape ||
        static_cast<int64_t>(it->second.data.size()) != NumElements(shape)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", name, "\" has shape ", ShapeToString(it->second.shape), " (",
                       it->second.data.size(), " values), expected ", ShapeToString(shape)));
    }
    shapes[name] = shape;
  }
  for (const auto& [name, t] : tensors) {
    if (!shapes.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", name, "\" is not a parameter of the model config"));
    }
  }
  return absl::OkStatus();
}

// Validates `c` the way configs are validated when read (ranges, exits reading one state).
absl::StatusOr<ModelConfig> Revalidate(const ModelConfig& c) {
  return ParseModelConfig(c.ToJson());
}

}  // namespace

absl::StatusOr<ExitInit> ParseExitInit(absl::string_view name) {
  const std::string s = absl::StrReplaceAll(absl::AsciiStrToLower(name), {{"_", "-"}});
  for (ExitInit i :
       {ExitInit::kRandom, ExitInit::kCopyFinal, ExitInit::kCopyMlp, ExitInit::kCopyBlock}) {
    if (s == ExitInitName(i)) return i;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "exit init \"", name, "\" is not one of random, copy-final, copy-mlp, copy-block"));
}

const char* ExitInitName(ExitInit init) {
  switch (init) {
    case ExitInit::kRandom:
      return "random";
    case ExitInit::kCopyFinal:
      return "copy-final";
    case ExitInit::kCopyMlp:
      return "copy-mlp";
    case ExitInit::kCopyBlock:
      return "copy-block";
  }
  return "?";
}

absl::Status AddExits(ModelConfig& c, HostTensorMap& tensors,
                      const std::vector<ExitConfig>& new_exits, ExitInit init, uint64_t seed) {
  RETURN_IF_ERROR(CheckTensorsMatch(c, tensors));
  // Checks with messages in terms of the request, before the generic config validation.
  for (size_t i = 0; i < new_exits.size(); ++i) {
    const ExitConfig& x = new_exits[i];
    const std::string where = absl::StrCat("new exit ", i, " (", Describe(x), ")");
    const int max_layer = x.position == ExitPosition::kPost ? c.num_layers - 1 : c.num_layers;
    if (x.layer < 1 || x.layer > max_layer) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": layer ", x.layer, " is out of range: a ", PositionName(x.position),
          "-layer exit needs 1 <= layer <= ", max_layer, " (num_layers ", c.num_layers, ")"));
    }
    if (init == ExitInit::kCopyMlp && x.kind != ExitKind::kMlp) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": init copy-mlp needs an mlp exit, not ", ExitKindName(x.kind)));
    }
    if (init == ExitInit::kCopyBlock && x.kind != ExitKind::kBlock) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": init copy-block needs a block exit, not ", ExitKindName(x.kind)));
    }
    for (size_t k = 0; k < c.exits.size(); ++k) {
      if (c.exits[k].depth() == x.depth()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, " reads the same hidden state as existing exit ", k, " (",
                         Describe(c.exits[k]), ")"));
      }
    }
    for (size_t k = 0; k < i; ++k) {
      if (new_exits[k].depth() == x.depth()) {
        return absl::InvalidArgumentError(absl::StrCat(where,
                                                       " reads the same hidden state as new exit ",
                                                       k, " (", Describe(new_exits[k]), ")"));
      }
    }
  }
  ModelConfig added = c;
  added.exits.insert(added.exits.end(), new_exits.begin(), new_exits.end());
  ASSIGN_OR_RETURN(ModelConfig next, Revalidate(added));
  // Depths are distinct, so an exit's new number is the rank of its depth.
  auto index_of_depth = [&](int depth) {
    for (size_t j = 0; j < next.exits.size(); ++j) {
      if (next.exits[j].depth() == depth) return static_cast<int>(j);
    }
    EE_CHECK(false, "no exit at depth ", depth);
    return -1;
  };
  // The new exits' tensors first (they may copy from `tensors`), then the existing tensors
  // move over under their new numbers; nothing can fail from here on.
  HostTensorMap out;
  const HostTensor& final_head =
      tensors.at(c.tie_embeddings ? "embedding.word.weight" : "output.weight");
  const std::string last_layer = absl::StrCat("layers.", c.num_layers - 1, ".");
  std::vector<bool> is_new(next.exits.size(), false);
  for (const ExitConfig& x : new_exits) is_new[index_of_depth(x.depth())] = true;
  for (auto& [name, shape] : EellmParamShapes(next)) {
    auto [k, rest] = SplitExitName(name);
    if (k < 0 || !is_new[k]) continue;
    const ExitConfig& x = next.exits[k];
    const HostTensor* src = nullptr;
    if (init != ExitInit::kRandom) {
      if (rest == "head.weight") src = &final_head;
      if (absl::StartsWith(rest, "norm.")) src = &tensors.at("final_norm." + rest.substr(5));
    }
    if (init == ExitInit::kCopyMlp && absl::StartsWith(rest, "mlp")) {
      src = &tensors.at(absl::StrCat("layers.", x.layer - 1, ".", rest));
    }
    if (init == ExitInit::kCopyBlock && absl::StartsWith(rest, "block.")) {
      src = &tensors.at(last_layer + rest.substr(6));
    }
    if (src) {
      EE_CHECK(src->shape == shape, "copying into ", name, ": shape ", ShapeToString(src->shape),
               " != ", ShapeToString(shape));
      out[name] = *src;
    } else {
      out[name] = RandomTensor(name, shape, seed);
    }
  }
  for (auto& [name, t] : tensors) {
    auto [k, rest] = SplitExitName(name);
    const std::string to =
        k < 0 ? name : absl::StrCat("exits.", index_of_depth(c.exits[k].depth()), ".", rest);
    out[to] = std::move(t);
  }
  c = std::move(next);
  tensors = std::move(out);
  return absl::OkStatus();
}

absl::Status SetExitPosition(ModelConfig& c, int exit_index, ExitPosition position) {
  if (exit_index < 0 || exit_index >= static_cast<int>(c.exits.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "exit index ", exit_index, " is out of range: the model has ", c.exits.size(), " exits"));
  }
  ExitConfig& x = c.exits[exit_index];
  if (x.position == position) return absl::OkStatus();
  const std::string where = absl::StrCat("exit ", exit_index, " (", Describe(x), ")");
  if (x.kind == ExitKind::kMlp) {
    return absl::InvalidArgumentError(absl::StrCat(
        where,
        " cannot move: a post-layer MLP-branch exit reads its layer's attention output, a "
        "pre-layer one the previous layer's output, so they compute different things"));
  }
  ModelConfig moved = c;
  ExitConfig& m = moved.exits[exit_index];
  if (position == ExitPosition::kPre) {
    m.layer += 1;  // post L (L <= num_layers - 1) -> pre L + 1
  } else {
    if (x.layer == 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, " cannot become a post-layer exit: it reads the embeddings (no post-layer 0)"));
    }
    m.layer -= 1;
  }
  m.position = position;
  ASSIGN_OR_RETURN(ModelConfig checked, Revalidate(moved));
  EE_CHECK(checked.exits[exit_index].depth() == x.depth(), "exit order changed");
  c = std::move(checked);
  return absl::OkStatus();
}

HostTensorMap ParamsToHost(const ParamStore& ps) {
  EE_CHECK(ps.allocated(), "ParamsToHost needs an allocated ParamStore");
  HostTensorMap out;
  for (int i = 0; i < static_cast<int>(ps.params().size()); ++i) {
    const ParamInfo& p = ps.params()[i];
    HostTensor& t = out[p.name];
    t.shape = p.shape;
    t.data.resize(p.numel);
    ps.backend()->CopyToHost(t.data.data(), ps.param(i), p.numel * sizeof(float));
  }
  return out;
}

absl::Status HostToParams(const HostTensorMap& t, ParamStore& ps) {
  EE_CHECK(ps.allocated(), "HostToParams needs an allocated ParamStore");
  for (const ParamInfo& p : ps.params()) {
    auto it = t.find(p.name);
    if (it == t.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", p.name, "\" is missing (parameter of shape ", ShapeToString(p.shape), ")"));
    }
    if (it->second.shape != p.shape || it->second.data.size() != p.numel) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", p.name, "\" has shape ", ShapeToString(it->second.shape), " (",
                       it->second.data.size(), " values), the parameter ", ShapeToString(p.shape)));
    }
  }
  for (const auto& [name, tensor] : t) {
    if (ps.Find(name) < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", name, "\" is not a parameter of the model"));
    }
  }
  for (int i = 0; i < static_cast<int>(ps.params().size()); ++i) {
    const ParamInfo& p = ps.params()[i];
    ps.backend()->CopyFromHost(ps.param(i), t.at(p.name).data.data(), p.numel * sizeof(float));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> HeadLogits(Model& m, absl::Span<const int32_t> ids,
                                              int exit_index) {
  const ModelConfig& c = m.config();
  if (!m.is_first_stage() || !m.is_last_stage() || m.tp().size != 1) {
    return absl::FailedPreconditionError("HeadLogits needs a whole model (one stage, tp 1)");
  }
  if (exit_index >= static_cast<int>(c.exits.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "exit index ", exit_index, " is out of range: the model has ", c.exits.size(), " exits"));
  }
  const int t = static_cast<int>(ids.size());
  if (t < 1 || t > c.max_seq_len) {
    return absl::InvalidArgumentError(
        absl::StrCat(t, " tokens: need 1 to max_seq_len ", c.max_seq_len));
  }
  for (int32_t id : ids) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  auto ws = m.MakeWorkspace(1, t);
  m.StageForward(*ws, ids.data(), nullptr);
  ConstOperand hidden;
  if (exit_index < 0) {
    hidden = m.FinalHidden(ws->final_norm, m.StageOutput(*ws), t);
  } else {
    const ExitConfig& x = c.exits[exit_index];
    const float* in;
    if (x.kind == ExitKind::kMlp && x.position == ExitPosition::kPost) {
      in = ws->layers[x.layer - 1].h_attn;
    } else {
      in = x.depth() == 0 ? ws->x0 : ws->layers[x.depth() - 1].out;
    }
    hidden = m.ExitHidden(exit_index, ws->exits[exit_index], in, ws->pos, 1, t, nullptr);
  }
  std::vector<float> logits(static_cast<size_t>(t) * c.vocab_size);
  Buffer device_logits(m.backend(), logits.size() * sizeof(float));  // all rows at once
  m.Project(device_logits.f32(), hidden, exit_index, t);
  m.backend()->CopyToHost(logits.data(), device_logits.f32(), logits.size() * sizeof(float));
  return logits;
}

}  // namespace eellm
