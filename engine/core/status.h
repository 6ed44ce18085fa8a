// Error handling: absl::Status helpers and the EE_CHECK invariant macro.
// Fallible boundaries (files, configs, checkpoints) return absl::Status(Or); programming
// invariants use EE_CHECK, which aborts with file:line and a message.
#pragma once

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define EE_CONCAT_INNER(a, b) a##b
#define EE_CONCAT(a, b) EE_CONCAT_INNER(a, b)

// Returns from the enclosing function if `expr` yields a non-OK status.
#define RETURN_IF_ERROR(expr)                \
  do {                                       \
    ::absl::Status ee_status_ = (expr);      \
    if (!ee_status_.ok()) return ee_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());` assigns the value or returns the error.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL(EE_CONCAT(ee_statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                          \
  if (!tmp.ok()) return tmp.status();         \
  lhs = std::move(tmp).value()

namespace eellm::internal {
[[noreturn]] inline void CheckFailed(const char* file, int line, const char* cond,
                                     const std::string& msg) {
  std::fprintf(stderr, "%s:%d: check failed: %s %s\n", file, line, cond, msg.c_str());
  std::fflush(stderr);
  std::abort();
}
}  // namespace eellm::internal

// EE_CHECK(cond, message parts...): aborts on a broken invariant (never for user input).
#define EE_CHECK(cond, ...)                                              \
  do {                                                                   \
    if (!(cond))                                                         \
      ::eellm::internal::CheckFailed(__FILE__, __LINE__, #cond,          \
                                     ::absl::StrCat("", ##__VA_ARGS__)); \
  } while (0)

// Aborts with the status message if it is not OK (for tests and top-level code).
#define EE_CHECK_OK(expr)                   \
  do {                                      \
    ::absl::Status ee_s_ = (expr);          \
    EE_CHECK(ee_s_.ok(), ee_s_.ToString()); \
  } while (0)
