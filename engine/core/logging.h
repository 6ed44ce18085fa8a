// Minimal logging: rank-aware info lines to stderr, printf-style via absl::StrFormat.
#pragma once

#include <cstdio>
#include <string>

#include "absl/strings/str_format.h"

namespace eellm {

// Only rank 0 prints informational lines; errors print on every rank.
void SetLogRank(int rank);
bool IsLogRank0();

template <typename... Args>
void LogInfo(const absl::FormatSpec<Args...>& fmt, const Args&... args) {
  if (!IsLogRank0()) return;
  std::string s = absl::StrFormat(fmt, args...);
  std::fprintf(stderr, "%s\n", s.c_str());
}

template <typename... Args>
void LogError(const absl::FormatSpec<Args...>& fmt, const Args&... args) {
  std::string s = absl::StrFormat(fmt, args...);
  std::fprintf(stderr, "error: %s\n", s.c_str());
  std::fflush(stderr);
}

}  // namespace eellm
