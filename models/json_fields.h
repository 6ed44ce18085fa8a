// Typed reading of JSON config objects (nlohmann::json) with errors that name the key, where it
// sits ("model config exits[1]") and the bad value. Used by the model and run configs.
#pragma once

#include <set>
#include <string>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace eellm {

// Fails on any key of `obj` not in `allowed` (and when `obj` is not an object).
inline absl::Status CheckJsonKeys(const nlohmann::json& obj, const std::set<std::string>& allowed,
                                  const std::string& where) {
  if (!obj.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, " must be a JSON object"));
  }
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    if (!allowed.count(it.key())) {
      return absl::InvalidArgumentError(absl::StrCat("unknown key \"", it.key(), "\" in ", where,
                                                     " (allowed: ", absl::StrJoin(allowed, ", "),
                                                     ")"));
    }
  }
  return absl::OkStatus();
}

// Reads obj[key] into *out (int, float, bool or std::string) when present, checking its type.
template <typename T>
absl::Status ReadJsonField(const nlohmann::json& obj, const std::string& key,
                           const std::string& where, T* out, bool required = false) {
  auto it = obj.find(key);
  if (it == obj.end()) {
    if (!required) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat("missing required key \"", key, "\" in ", where));
  }
  bool ok;
  if constexpr (std::is_same_v<T, int>) {
    ok = it->is_number_integer();
  } else if constexpr (std::is_same_v<T, float>) {
    ok = it->is_number();
  } else if constexpr (std::is_same_v<T, bool>) {
    ok = it->is_boolean();
  } else {
    static_assert(std::is_same_v<T, std::string>, "unsupported field type");
    ok = it->is_string();
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("key \"", key, "\" in ", where, " has the wrong type: ", it->dump()));
  }
  *out = it->get<T>();
  return absl::OkStatus();
}

}  // namespace eellm
