#include "launch/megatron_convert.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"
#include "checkpoints/torch_file.h"
#include "engine/core/status.h"
#include "launch/hf_convert.h"
#include "nlohmann/json.hpp"

namespace eellm {
namespace {

namespace fs = std::filesystem;
using Kind = PyValue::Kind;

// ---- args ----

absl::Status BadArg(absl::string_view name, const PyValue* v, absl::string_view want) {
  return absl::InvalidArgumentError(
      absl::StrCat("Megatron argument ", name, " = ", v ? v->Describe() : "(missing)", ": ", want));
}

absl::StatusOr<int64_t> ArgInt(const PyValue& args, absl::string_view name) {
  const PyValue* v = args.Attr(name);
  if (v == nullptr || !v->is(Kind::kInt)) return BadArg(name, v, "expected an integer");
  return v->i;
}
// An optional argument: `dflt` when missing or None.
int64_t ArgIntOr(const PyValue& args, absl::string_view name, int64_t dflt) {
  const PyValue* v = args.Attr(name);
  return v != nullptr && v->is(Kind::kInt) ? v->i : dflt;
}
double ArgFloatOr(const PyValue& args, absl::string_view name, double dflt) {
  const PyValue* v = args.Attr(name);
  if (v != nullptr && v->is(Kind::kFloat)) return v->f;
  if (v != nullptr && v->is(Kind::kInt)) return static_cast<double>(v->i);
  return dflt;
}
bool ArgBool(const PyValue& args, absl::string_view name, bool dflt = false) {
  const PyValue* v = args.Attr(name);
  if (v != nullptr && v->is(Kind::kBool)) return v->b;
  if (v != nullptr && v->is(Kind::kInt)) return v->i != 0;
  return dflt;
}
std::string ArgStr(const PyValue& args, absl::string_view name, const std::string& dflt) {
  const PyValue* v = args.Attr(name);
  return v != nullptr && v->is(Kind::kStr) ? v->str : dflt;
}
// A per-exit list (exit_layer_temperature, exit_layer_weight): entry i, or `dflt` when short.
double ArgListAt(const PyValue& args, absl::string_view name, size_t i, double dflt) {
  const PyValue* v = args.Attr(name);
  if (v == nullptr || !(v->is(Kind::kList) || v->is(Kind::kTuple)) || i >= v->items.size()) {
    return dflt;
  }
  const PyValue& x = *v->items[i];
  return x.is(Kind::kFloat) ? x.f : x.is(Kind::kInt) ? static_cast<double>(x.i) : dflt;
}

absl::StatusOr<std::vector<int>> ExitLayers(const PyValue& args) {
  std::vector<int> layers;
  const PyValue* v = args.Attr("exit_layer_nums");
  if (v == nullptr || v->is(Kind::kNone)) return layers;
  if (!v->is(Kind::kList) && !v->is(Kind::kTuple)) {
    return BadArg("exit_layer_nums", v, "expected a list of layer numbers");
  }
  for (const PyPtr x : v->items) {
    if (!x->is(Kind::kInt)) return BadArg("exit_layer_nums", v, "expected integers");
    layers.push_back(static_cast<int>(x->i));
  }
  return layers;
}

// ---- tensors ----

int64_t Rows(const HostTensor& t) { return t.shape.empty() ? 1 : t.shape[0]; }
int64_t RowSize(const HostTensor& t) { return Rows(t) == 0 ? 0 : NumElements(t.shape) / Rows(t); }

HostTensor SliceRows(const HostTensor& t, int64_t begin, int64_t count) {
  HostTensor out;
  out.shape = t.shape;
  out.shape[0] = count;
  const int64_t w = RowSize(t);
  out.data.assign(t.data.begin() + begin * w, t.data.begin() + (begin + count) * w);
  return out;
}

HostTensor ConcatRows(const std::vector<HostTensor>& parts) {
  HostTensor out;
  out.shape = parts[0].shape;
  out.shape[0] = 0;
  for (const HostTensor& p : parts) {
    out.shape[0] += p.shape[0];
    out.data.insert(out.data.end(), p.data.begin(), p.data.end());
  }
  return out;
}

// [rows, c_r] parts -> [rows, sum c_r].
absl::StatusOr<HostTensor> ConcatColumns(const std::vector<HostTensor>& parts) {
  for (const HostTensor& p : parts) {
    if (p.shape.size() != 2 || p.shape[0] != parts[0].shape[0]) {
      return absl::InvalidArgumentError("expected matrices of equal rows on every rank");
    }
  }
  HostTensor out;
  const int64_t rows = parts[0].shape[0];
  int64_t cols = 0;
  for (const HostTensor& p : parts) cols += p.shape[1];
  out.shape = {rows, cols};
  out.data.reserve(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (const HostTensor& p : parts) {
      out.data.insert(out.data.end(), p.data.begin() + r * p.shape[1],
                      p.data.begin() + (r + 1) * p.shape[1]);
    }
  }
  return out;
}

// One stage's tensors: Megatron name (normalized) -> one tensor per tensor-parallel rank.
using RankTensors = std::map<std::string, std::vector<HostTensor>>;

// Megatron-core's GPTModel names (local or Transformer Engine layers, whose linear_qkv and
// linear_fc1 carry the preceding norm as layer_norm_weight/bias) and the old spellings Megatron's
// loaders still accept -> the legacy names the mapping below reads.
std::string NormalizeName(std::string n) {
  static const std::pair<const char*, const char*> kCorePrefixes[] = {
      {"decoder.", "language_model.encoder."},
      {"embedding.", "language_model.embedding."},
      {"output_layer.", "language_model.output_layer."}};
  static const std::pair<const char*, const char*> kCoreParts[] = {
      {"self_attention.linear_qkv.layer_norm_", "input_layernorm."},
      {"mlp.linear_fc1.layer_norm_", "post_attention_layernorm."},
      {"pre_mlp_layernorm.", "post_attention_layernorm."},
      {"self_attention.linear_qkv.", "self_attention.query_key_value."},
      {"self_attention.linear_proj.", "self_attention.dense."},
      {"mlp.linear_fc1.", "mlp.dense_h_to_4h."},
      {"mlp.linear_fc2.", "mlp.dense_4h_to_h."}};
  for (const auto& [from, to] : kCorePrefixes) {
    if (!absl::StartsWith(n, from)) continue;
    n = absl::StrCat(to, n.substr(std::string(from).size()));
    for (const auto& [part, legacy] : kCoreParts) n = absl::StrReplaceAll(n, {{part, legacy}});
    break;
  }
  return absl::StrReplaceAll(n, {{"layernorm", "norm"}, {".attention.", ".self_attention."}});
}

absl::Status CollectTensors(const TorchFile& f, const PyValue& dict, const std::string& prefix,
                            RankTensors* out, size_t rank, size_t ranks, int depth = 0) {
  if (depth > 16) {  // a model state is a few levels deep; a pickle may nest (or cycle) forever
    return absl::InvalidArgumentError(
        absl::StrCat(f.path(), ": ", prefix.substr(0, 200), " nests too deep"));
  }
  if (!dict.is(Kind::kDict)) {
    return absl::InvalidArgumentError(
        absl::StrCat(f.path(), ": ", prefix, " is ", dict.Describe(), ", expected a dict"));
  }
  for (const auto& [k, v] : dict.dict) {
    if (!k->is(Kind::kStr)) continue;
    const std::string name = prefix.empty() ? k->str : absl::StrCat(prefix, ".", k->str);
    if (v->is(Kind::kDict)) {
      RETURN_IF_ERROR(CollectTensors(f, *v, name, out, rank, ranks, depth + 1));
      continue;
    }
    // Transformer Engine's _extra_state (fp8 metadata, sometimes a byte tensor) and other
    // non-tensors.
    if (absl::EndsWith(name, "_extra_state")) continue;
    if (!TorchFile::IsTensor(*v)) {
      // A tensor in an encoding this reader does not know must not vanish silently.
      if (v->is(Kind::kObject) && absl::StartsWith(v->str, "torch.")) {
        return absl::InvalidArgumentError(absl::StrCat(f.path(), ": ", name, " is a ", v->str,
                                                       "(...) call, not a tensor eellm can read"));
      }
      continue;
    }
    ASSIGN_OR_RETURN(HostTensor t, f.ReadTensor(*v, name));
    auto& slot = (*out)[NormalizeName(name)];
    slot.resize(ranks);
    slot[rank] = std::move(t);
  }
  return absl::OkStatus();
}

// ---- files ----

std::string RankDir(int tp_rank, int pp_rank, int pp) {
  return pp > 1 ? absl::StrFormat("mp_rank_%02d_%03d", tp_rank, pp_rank)
                : absl::StrFormat("mp_rank_%02d", tp_rank);
}

// Megatron-core's torch_dist format (PyTorch distributed checkpointing) is not read.
absl::Status RefuseDistributed(const fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(dir / ".metadata", ec)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(dir.string(),
                   " is in Megatron's distributed format (torch_dist: .metadata and *.distcp "
                   "files); re-save it in the torch format (Megatron's --ckpt-convert-format "
                   "torch) and convert that"));
}

// The iteration directory (or the single file) `path` names, and its iteration.
absl::StatusOr<std::pair<fs::path, int64_t>> FindIteration(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return absl::NotFoundError(absl::StrCat(path, " not found"));
  if (fs::is_regular_file(path, ec)) return std::make_pair(fs::path(path), int64_t{-1});
  const fs::path tracker = fs::path(path) / "latest_checkpointed_iteration.txt";
  if (fs::exists(tracker, ec)) {
    std::ifstream in(tracker);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string s(absl::StripAsciiWhitespace(text));
    if (s == "release") return std::make_pair(fs::path(path) / "release", int64_t{0});
    int64_t it = 0;
    if (!absl::SimpleAtoi(s, &it) || it < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(tracker.string(), " holds '", s, "', expected an iteration or release"));
    }
    const fs::path dir = fs::path(path) / absl::StrFormat("iter_%07d", it);
    if (!fs::is_directory(dir, ec)) {
      return absl::NotFoundError(absl::StrCat(tracker.string(), " names iteration ", it, " but ",
                                              dir.string(), " does not exist"));
    }
    return std::make_pair(dir, it);
  }
  for (const char* first : {"mp_rank_00", "mp_rank_00_000"}) {
    if (fs::exists(fs::path(path) / first / "model_optim_rng.pt", ec)) {
      int64_t it = 0;
      absl::SimpleAtoi(absl::StripPrefix(fs::path(path).filename().string(), "iter_"), &it);
      return std::make_pair(fs::path(path), it);
    }
  }
  RETURN_IF_ERROR(RefuseDistributed(path));
  return absl::NotFoundError(
      absl::StrCat(path,
                   " is not a Megatron checkpoint: no latest_checkpointed_iteration.txt, no "
                   "mp_rank_00/model_optim_rng.pt or mp_rank_00_000/model_optim_rng.pt"));
}

// ---- the mapping ----

class Mapper {
 public:
  Mapper(const ModelConfig& c, int tp, std::vector<int> exit_layers, bool layernorm_1p,
         HostTensorMap* out)
      : c_(c),
        tp_(tp),
        exit_layers_(std::move(exit_layers)),
        layernorm_1p_(layernorm_1p),
        out_(out) {}

  // Every tensor of one pipeline stage (its layers from `first_layer`, 0-based); errors name
  // `where`.
  absl::Status Stage(const RankTensors& stage_tensors, int first_layer, int stage_layers,
                     const std::string& where);

 private:
  absl::Status Put(const std::string& name, HostTensor t) {
    if (out_->count(name)) return absl::InvalidArgumentError(absl::StrCat(name, " appears twice"));
    (*out_)[name] = std::move(t);
    return absl::OkStatus();
  }
  // The eellm exit index of the exit at 1-based layer `layer`.
  int ExitIndex(int layer) const {
    for (size_t k = 0; k < c_.exits.size(); ++k) {
      if (c_.exits[k].layer == layer) return static_cast<int>(k);
    }
    return -1;
  }
  // A norm's weight or bias (replicated; rank 0's), LayerNorm1P's gains shifted back.
  HostTensor Norm(const std::vector<HostTensor>& parts, bool weight) const {
    HostTensor t = parts[0];
    if (weight && layernorm_1p_ && !c_.use_rmsnorm()) {
      for (float& x : t.data) x += 1.0f;
    }
    return t;
  }

  // Maps a block's tensor `sub` (after "layers.i." or "exit_block.") to eellm names under
  // `to` ("layers.3." or "exits.0.block."). Returns false when `sub` is not a block tensor.
  absl::StatusOr<bool> Block(const std::string& sub, const std::vector<HostTensor>& parts,
                             const std::string& to) {
    const bool weight = absl::EndsWith(sub, ".weight");
    const std::string wb = weight ? "weight" : "bias";
    if (sub == "input_norm." + wb) {
      RETURN_IF_ERROR(Put(to + "attn_norm." + wb, Norm(parts, weight)));
      return true;
    }
    if (sub == "post_attention_norm." + wb) {
      RETURN_IF_ERROR(Put(to + "mlp_norm." + wb, Norm(parts, weight)));
      return true;
    }
    if (sub == "self_attention.query_key_value." + wb) {
      RETURN_IF_ERROR(Qkv(parts, to, wb));
      return true;
    }
    if (sub == "self_attention.dense.weight") {
      ASSIGN_OR_RETURN(HostTensor wo, ConcatColumns(parts));
      RETURN_IF_ERROR(Put(to + "attn.wo.weight", std::move(wo)));
      return true;
    }
    if (sub == "self_attention.dense.bias") {
      RETURN_IF_ERROR(Put(to + "attn.wo.bias", parts[0]));
      return true;
    }
    for (const std::string mlp : {"mlp.", "mlp.trunk."}) {
      if (!absl::StartsWith(sub, mlp) || absl::StartsWith(sub, "mlp.branch.")) continue;
      ASSIGN_OR_RETURN(bool done, Mlp(sub.substr(mlp.size()), parts, to + "mlp."));
      if (done) return true;
    }
    return false;
  }

  // dense_h_to_4h / dense_4h_to_h under `to` ("layers.3.mlp.").
  absl::StatusOr<bool> Mlp(const std::string& sub, const std::vector<HostTensor>& parts,
                           const std::string& to) {
    const bool weight = absl::EndsWith(sub, ".weight");
    const std::string wb = weight ? "weight" : "bias";
    if (sub == "dense_h_to_4h." + wb) {
      if (!c_.use_swiglu()) {
        RETURN_IF_ERROR(Put(to + "fc1." + wb, ConcatRows(parts)));
        return true;
      }
      std::vector<HostTensor> gate, up;
      for (const HostTensor& p : parts) {  // [gate_r; up_r] per rank
        if (Rows(p) % 2 != 0) {
          return absl::InvalidArgumentError(
              absl::StrCat("has ", Rows(p),
                           " rows per rank; SwiGLU's gate and up need an even "
                           "number"));
        }
        const int64_t half = Rows(p) / 2;
        gate.push_back(SliceRows(p, 0, half));
        up.push_back(SliceRows(p, half, half));
      }
      RETURN_IF_ERROR(Put(to + "fc1." + wb, ConcatRows(gate)));
      RETURN_IF_ERROR(Put(to + "up." + wb, ConcatRows(up)));
      return true;
    }
    if (sub == "dense_4h_to_h.weight") {
      ASSIGN_OR_RETURN(HostTensor fc2, ConcatColumns(parts));
      RETURN_IF_ERROR(Put(to + "fc2.weight", std::move(fc2)));
      return true;
    }
    if (sub == "dense_4h_to_h.bias") {
      RETURN_IF_ERROR(Put(to + "fc2.bias", parts[0]));
      return true;
    }
    return false;
  }

  // Group-major [q heads of the group..., k, v] rows per KV group, groups split over ranks.
  absl::Status Qkv(const std::vector<HostTensor>& parts, const std::string& to,
                   const std::string& wb) {
    const int d = c_.head_dim(), groups = c_.num_kv_heads / tp_,
              per = c_.num_heads / c_.num_kv_heads;
    std::vector<HostTensor> q, k, v;
    for (const HostTensor& p : parts) {
      if (Rows(p) != static_cast<int64_t>(groups) * (per + 2) * d) {
        return absl::InvalidArgumentError(absl::StrCat(to, "query_key_value.", wb, " has ", Rows(p),
                                                       " rows per rank; ", groups, " KV groups of ",
                                                       per, " query heads and head size ", d,
                                                       " need ", groups * (per + 2) * d));
      }
      for (int g = 0; g < groups; ++g) {
        const int64_t base = static_cast<int64_t>(g) * (per + 2) * d;
        q.push_back(SliceRows(p, base, static_cast<int64_t>(per) * d));
        k.push_back(SliceRows(p, base + static_cast<int64_t>(per) * d, d));
        v.push_back(SliceRows(p, base + static_cast<int64_t>(per + 1) * d, d));
      }
    }
    RETURN_IF_ERROR(Put(to + "attn.wq." + wb, ConcatRows(q)));
    RETURN_IF_ERROR(Put(to + "attn.wk." + wb, ConcatRows(k)));
    return Put(to + "attn.wv." + wb, ConcatRows(v));
  }

  absl::StatusOr<bool> One(const std::string& name, const std::vector<HostTensor>& parts,
                           int first_layer, const std::vector<int>& stage_exits) {
    if (name == "language_model.embedding.word_embeddings.weight") {
      RETURN_IF_ERROR(Put("embedding.word.weight", ConcatRows(parts)));
      return true;
    }
    if (name == "language_model.embedding.position_embeddings.weight") {
      RETURN_IF_ERROR(Put("embedding.position.weight", parts[0]));
      return true;
    }
    if (name == "language_model.output_layer.weight" && c_.tie_embeddings) {
      return true;  // Megatron-core's last stage keeps a copy of the tied embeddings
    }
    if (name == "language_model.output_layer.weight") {
      RETURN_IF_ERROR(Put("output.weight", ConcatRows(parts)));
      return true;
    }
    if (name == "word_embeddings_for_head.weight") return true;  // a copy of the embeddings
    if (absl::StartsWith(name, "language_model.exit_output_layer.")) {
      int i = -1;
      const std::string idx(absl::StripSuffix(
          absl::StripPrefix(name, "language_model.exit_output_layer."), ".weight"));
      if (!absl::SimpleAtoi(idx, &i) || i < 0 || i >= static_cast<int>(stage_exits.size())) {
        return absl::InvalidArgumentError(absl::StrCat(
            name, ": this stage has ", stage_exits.size(), " exits (exit_layer_nums)"));
      }
      RETURN_IF_ERROR(Put(absl::StrCat("exits.", ExitIndex(stage_exits[i]), ".head.weight"),
                          ConcatRows(parts)));
      return true;
    }
    for (const char* enc : {"language_model.encoder.", "language_model.transformer."}) {
      if (!absl::StartsWith(name, enc)) continue;
      const std::string rest = name.substr(std::string(enc).size());
      for (const char* wb : {"weight", "bias"}) {
        if (rest == absl::StrCat("final_norm.", wb)) {
          RETURN_IF_ERROR(Put(absl::StrCat("final_norm.", wb), Norm(parts, rest.back() == 't')));
          return true;
        }
      }
      if (!absl::StartsWith(rest, "layers.")) return false;
      const size_t dot = rest.find('.', 7);
      int local = -1;
      if (dot == std::string::npos || !absl::SimpleAtoi(rest.substr(7, dot - 7), &local)) {
        return false;
      }
      const int layer = first_layer + local;  // 0-based global
      const std::string sub = rest.substr(dot + 1);
      ASSIGN_OR_RETURN(bool done, Block(sub, parts, absl::StrCat("layers.", layer, ".")));
      if (done) return true;
      const int k = ExitIndex(layer + 1);
      if (k < 0) return false;
      const std::string exit = absl::StrCat("exits.", k, ".");
      if (absl::StartsWith(sub, "exit_norm.")) {
        const bool weight = absl::EndsWith(sub, ".weight");
        RETURN_IF_ERROR(Put(exit + (weight ? "norm.weight" : "norm.bias"), Norm(parts, weight)));
        return true;
      }
      if (absl::StartsWith(sub, "exit_block.")) {
        return Block(sub.substr(11), parts, exit + "block.");
      }
      if (absl::StartsWith(sub, "mlp.branch.")) {
        // EE-LLM computes the branch for pre exits too but their exit reads the layer's input
        // (exit_block, exit_norm only): the branch is unused there.
        if (c_.exits[k].kind != ExitKind::kMlp) return true;
        return Mlp(sub.substr(11), parts, exit + "mlp.");
      }
      return false;
    }
    return false;
  }

  const ModelConfig& c_;
  int tp_;
  std::vector<int> exit_layers_;  // args order (exit_output_layer indices follow it per stage)
  bool layernorm_1p_;
  HostTensorMap* out_;
};

absl::Status Mapper::Stage(const RankTensors& stage_tensors, int first_layer, int stage_layers,
                           const std::string& where) {
  // Exits of this stage, in args order: exit_output_layer.{i} is the i-th.
  std::vector<int> stage_exits;
  for (int l : exit_layers_) {
    if (l > first_layer && l <= first_layer + stage_layers) stage_exits.push_back(l);
  }
  for (const auto& [name, parts] : stage_tensors) {
    // Shards of one tensor have one shape on every rank (Megatron splits evenly), of rank 1 or 2.
    for (size_t r = 0; r < parts.size(); ++r) {
      if (parts[r].shape.empty() && parts[r].data.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": tensor-parallel rank ", r,
                                                       " lacks ", name, " (another rank has it)"));
      }
      if (parts[r].shape.empty() || parts[r].shape.size() > 2 || parts[r].shape != parts[0].shape) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": ", name, " is [", absl::StrJoin(parts[r].shape, ", "), "] on rank ", r,
            " and [", absl::StrJoin(parts[0].shape, ", "), "] on rank 0"));
      }
    }
    auto done = One(name, parts, first_layer, stage_exits);
    if (!done.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", name, ": ", done.status().message()));
    }
    if (!*done) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": tensor ", name, " has no eellm counterpart"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfigFromMegatronArgs(const PyValue& args,
                                                        std::vector<std::string>* warnings) {
  ASSIGN_OR_RETURN(const int64_t layers, ArgInt(args, "num_layers"));
  ASSIGN_OR_RETURN(const int64_t hidden, ArgInt(args, "hidden_size"));
  ASSIGN_OR_RETURN(const int64_t heads, ArgInt(args, "num_attention_heads"));
  ASSIGN_OR_RETURN(const int64_t vocab, ArgInt(args, "padded_vocab_size"));
  ASSIGN_OR_RETURN(const int64_t positions, ArgInt(args, "max_position_embeddings"));
  const int64_t ffn = ArgIntOr(args, "ffn_hidden_size", 4 * hidden);
  const int64_t kv_channels = ArgIntOr(args, "kv_channels", heads > 0 ? hidden / heads : 0);
  const int64_t kv_heads =
      ArgBool(args, "group_query_attention") ? ArgIntOr(args, "num_query_groups", heads) : heads;
  // Training settings that are not the model's: said, so that a run going on from the
  // conversion can train as the Megatron run did.
  if (const double p = ArgFloatOr(args, "hidden_dropout", 0); p > 0) {
    warnings->push_back(absl::StrCat(
        "the run trained with hidden_dropout ", p, "; pass --hidden-dropout=", p,
        " (or \"hidden_dropout\" in the train config) to eellm train to go on as it did",
        ArgFloatOr(args, "attention_dropout", 0) > 0
            ? absl::StrCat(" (its attention_dropout ", ArgFloatOr(args, "attention_dropout", 0),
                           " eellm does not implement)")
            : ""));
  }
  const std::string norm = ArgStr(args, "normalization", "LayerNorm");
  std::string pos = ArgStr(args, "position_embedding_type", "learned_absolute");
  if (ArgBool(args, "use_rotary_position_embeddings")) pos = "rope";
  const bool swiglu = ArgBool(args, "swiglu");
  const bool bias = ArgBool(args, "add_bias_linear", true);
  const bool qkv_bias = ArgBool(args, "add_qkv_bias");

  nlohmann::json j;
  if (norm == "LayerNorm" && pos == "learned_absolute" && !swiglu && bias) {
    j["style"] = "gpt";
    if (ArgBool(args, "squared_relu")) {
      return BadArg("squared_relu", args.Attr("squared_relu"), "eellm has GELU and SwiGLU only");
    }
    const bool tanh_gelu = ArgBool(args, "openai_gelu") ||
                           (!ArgBool(args, "onnx_safe") && ArgBool(args, "bias_gelu_fusion", true));
    if (!tanh_gelu) {
      warnings->push_back(
          "this model was trained with the exact (erf) GELU; eellm computes the tanh "
          "approximation (activations differ by up to 4.7e-4)");
    }
  } else if (norm == "RMSNorm" && pos == "rope" && swiglu && !bias) {
    j["style"] = "llama";
    if (qkv_bias) j["qkv_bias"] = true;
    if (kv_channels * heads != hidden) j["head_dim"] = kv_channels;
    const double percent = ArgFloatOr(args, "rotary_percent", 1.0);
    if (percent != 1.0) {
      return BadArg("rotary_percent", args.Attr("rotary_percent"),
                    "eellm rotates whole heads (rotary_percent 1.0)");
    }
    j["rope_theta"] = ArgFloatOr(args, "rotary_base", 10000.0);
    const double factor = ArgFloatOr(args, "rotary_seq_len_interpolation_factor", 0.0);
    if (factor > 0 && factor != 1.0) j["rope_scaling"] = {{"type", "linear"}, {"factor", factor}};
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "Megatron model with normalization ", norm, ", position_embedding_type ", pos, ", swiglu ",
        swiglu, ", add_bias_linear ", bias,
        ": eellm reads LayerNorm + learned_absolute + GELU + biases (GPT) or RMSNorm + rope + "
        "swiglu without biases (Llama)"));
  }
  if (ArgBool(args, "apply_residual_connection_post_layernorm")) {
    return BadArg("apply_residual_connection_post_layernorm",
                  args.Attr("apply_residual_connection_post_layernorm"), "not supported by eellm");
  }
  for (const char* unsupported :
       {"qk_layernorm", "rotary_interleaved", "use_rope_scaling", "moe_grouped_gemm"}) {
    if (ArgBool(args, unsupported)) {
      return BadArg(unsupported, args.Attr(unsupported), "not supported by eellm");
    }
  }
  if (ArgIntOr(args, "num_experts", 0) > 0) {
    return BadArg("num_experts", args.Attr("num_experts"),
                  "mixture-of-experts models are not supported by eellm");
  }
  j["vocab_size"] = vocab;
  j["hidden_size"] = hidden;
  j["num_layers"] = layers;
  j["num_heads"] = heads;
  j["num_kv_heads"] = kv_heads;
  j["ffn_hidden_size"] = ffn;
  j["max_seq_len"] = positions;
  j["norm_eps"] = ArgFloatOr(args, "norm_epsilon", ArgFloatOr(args, "layernorm_epsilon", 1e-5));
  j["tie_embeddings"] = !ArgBool(args, "untie_embeddings_and_output_weights");

  ASSIGN_OR_RETURN(std::vector<int> exit_layers, ExitLayers(args));
  const bool exit_norm = ArgBool(args, "use_exit_norm"), exit_mlp = ArgBool(args, "use_exit_mlp"),
             exit_block = ArgBool(args, "use_exit_block");
  // A pre exit reads the layer's input: EE-LLM applies only exit_block and exit_norm there.
  const bool pre = ArgBool(args, "pre_exit");
  if (((exit_mlp && !pre) || exit_block) && !exit_norm && !exit_layers.empty()) {
    return BadArg(exit_mlp ? "use_exit_mlp" : "use_exit_block",
                  args.Attr(exit_mlp ? "use_exit_mlp" : "use_exit_block"),
                  "eellm's mlp and block exits end in a norm; this checkpoint's exits have no "
                  "exit_norm (use_exit_norm False)");
  }
  if (exit_mlp && exit_block) {
    return BadArg("use_exit_mlp", args.Attr("use_exit_mlp"), "not together with use_exit_block");
  }
  const char* kind = exit_block         ? "block"
                     : exit_mlp && !pre ? "mlp"
                     : exit_norm        ? "norm"
                                        : "linear";
  j["exits"] = nlohmann::json::array();
  for (size_t i = 0; i < exit_layers.size(); ++i) {
    const double weight = ArgListAt(args, "exit_layer_weight", i, 1.0);
    j["exits"].push_back(
        {{"layer", exit_layers[i]},
         {"loss_weight_init", ArgListAt(args, "exit_layer_weight_init", i, weight)},
         {"loss_weight_warmup_iters", ArgIntOr(args, "exit_layer_weight_warmup_iters", 0)},
         {"loss_weight_warmup", ArgStr(args, "exit_layer_weight_warmup_style", "linear")},
         {"kind", kind},
         {"position", pre ? "pre" : "post"},
         {"tied", !ArgBool(args, "untie_exit_output_weights")},
         {"temperature", ArgListAt(args, "exit_layer_temperature", i, 1.0)},
         {"loss_weight", weight}});
  }
  auto c = ParseModelConfig(j.dump());
  if (!c.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the Megatron arguments give an invalid eellm config: ", c.status().message()));
  }
  return c;
}

absl::StatusOr<MegatronModel> ReadMegatronCheckpoint(const std::string& path, bool progress) {
  ASSIGN_OR_RETURN(auto found, FindIteration(path));
  const auto& [dir, iteration] = found;
  const bool single = std::filesystem::is_regular_file(dir);
  if (!single) RETURN_IF_ERROR(RefuseDistributed(dir));
  auto file_of = [&](int t, int p, int pp) {
    return single ? dir : dir / RankDir(t, p, pp) / "model_optim_rng.pt";
  };
  fs::path first = file_of(0, 0, 1);
  if (!single && !fs::exists(first)) first = dir / "mp_rank_00_000" / "model_optim_rng.pt";
  ASSIGN_OR_RETURN(std::unique_ptr<TorchFile> f0, TorchFile::Open(first.string()));
  const PyValue* args = f0->root().Get("args");
  if (args == nullptr || !args->is(Kind::kObject)) {
    return absl::InvalidArgumentError(
        absl::StrCat(first.string(), " has no 'args' Namespace: not a Megatron checkpoint"));
  }
  MegatronModel m;
  ASSIGN_OR_RETURN(m.config, ModelConfigFromMegatronArgs(*args, &m.warnings));
  m.tp = static_cast<int>(ArgIntOr(*args, "tensor_model_parallel_size", 1));
  m.pp = static_cast<int>(ArgIntOr(*args, "pipeline_model_parallel_size", 1));
  const PyValue* it = f0->root().Get("iteration");
  m.iteration = iteration >= 0 ? iteration : (it != nullptr && it->is(Kind::kInt) ? it->i : 0);
  m.tokenizer = ArgStr(*args, "tokenizer_type", "");
  for (const char* file : {"vocab_file", "merge_file", "tokenizer_model"}) {
    const std::string v = ArgStr(*args, file, "");
    if (!v.empty()) absl::StrAppend(&m.tokenizer, " ", file, "=", v);
  }
  {
    std::error_code ec;
    auto is_file = [&](const std::string& p) { return !p.empty() && fs::is_regular_file(p, ec); };
    const std::string vocab = ArgStr(*args, "vocab_file", "");
    const std::string merges = ArgStr(*args, "merge_file", "");
    const std::string model = ArgStr(*args, "tokenizer_model", "");
    if (is_file(vocab) && is_file(merges) && absl::EndsWith(vocab, ".json")) {
      m.tokenizer_spec = absl::StrCat(vocab, ",", merges);
    } else if (is_file(model) &&
               (absl::EndsWith(model, ".model") || absl::EndsWith(model, ".json"))) {
      m.tokenizer_spec = model;
    } else if (!model.empty() && is_file((fs::path(model) / "tokenizer.json").string())) {
      m.tokenizer_spec = (fs::path(model) / "tokenizer.json").string();
    }
  }
  if (m.tp < 1 || m.pp < 1 || m.config.num_layers % m.pp != 0 ||
      (m.config.num_kv_heads % m.tp != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Megatron layout tp ", m.tp, " x pp ", m.pp, " does not split ",
                     m.config.num_layers, " layers and ", m.config.num_kv_heads, " KV groups"));
  }
  if (single && (m.tp > 1 || m.pp > 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is one file of a tp ", m.tp, " x pp ", m.pp,
                     " checkpoint; pass the checkpoint (or iteration) directory"));
  }
  ASSIGN_OR_RETURN(std::vector<int> exit_layers, ExitLayers(*args));
  Mapper mapper(m.config, m.tp, exit_layers, ArgBool(*args, "apply_layernorm_1p"), &m.tensors);
  const int stage_layers = m.config.num_layers / m.pp;
  for (int p = 0; p < m.pp; ++p) {
    RankTensors stage;
    for (int t = 0; t < m.tp; ++t) {
      const fs::path file = file_of(t, p, m.pp);
      std::unique_ptr<TorchFile> owned;
      const TorchFile* f = f0.get();
      if (p != 0 || t != 0) {
        ASSIGN_OR_RETURN(owned, TorchFile::Open(file.string()));
        f = owned.get();
      }
      const PyValue* model = f->root().Get("model");
      if (model == nullptr) {
        if (f->root().Get("model0") != nullptr) {
          return absl::InvalidArgumentError(absl::StrCat(
              file.string(), ": virtual pipeline stages (model0, model1, ...) are not supported"));
        }
        return absl::InvalidArgumentError(absl::StrCat(file.string(), " has no 'model'"));
      }
      RETURN_IF_ERROR(CollectTensors(*f, *model, "", &stage, t, m.tp));
      if (progress) {
        std::printf("read %s (stage %d of %d, tensor rank %d of %d)\n", file.string().c_str(),
                    p + 1, m.pp, t + 1, m.tp);
        std::fflush(stdout);
      }
    }
    RETURN_IF_ERROR(
        mapper.Stage(stage, p * stage_layers, stage_layers, (dir / RankDir(0, p, m.pp)).string()));
  }
  // Shared inputs of mlp exits: the branch reads the layer's post-attention norm.
  for (size_t k = 0; k < m.config.exits.size(); ++k) {
    const ExitConfig& x = m.config.exits[k];
    if (x.kind != ExitKind::kMlp) continue;
    for (const char* wb : {"weight", "bias"}) {
      auto src = m.tensors.find(absl::StrCat("layers.", x.layer - 1, ".mlp_norm.", wb));
      if (src != m.tensors.end())
        m.tensors[absl::StrCat("exits.", k, ".mlp_norm.", wb)] = src->second;
    }
  }
  // Every parameter present, with its shape, and nothing else.
  const auto expected = EellmParamShapes(m.config);
  for (const auto& [name, shape] : expected) {
    auto t = m.tensors.find(name);
    if (t == m.tensors.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(dir.string(), ": no tensor for eellm parameter ", name));
    }
    if (t->second.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          dir.string(), ": ", name, " has shape [", absl::StrJoin(t->second.shape, ", "),
          "], the arguments give [", absl::StrJoin(shape, ", "), "]"));
    }
  }
  if (m.tensors.size() != expected.size()) {
    for (const auto& [name, t] : m.tensors) {
      bool known = false;
      for (const auto& e : expected) known = known || e.first == name;
      if (!known) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir.string(), ": ", name, " is not a parameter of the model"));
      }
    }
  }
  return m;
}

}  // namespace eellm
