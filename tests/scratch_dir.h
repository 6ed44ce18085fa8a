// Where a test process writes its files: one directory per process under gtest's temp dir
// (ctest runs tests in parallel processes), removed when the process exits, so test runs leave
// nothing behind in /tmp.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <string>
#include <system_error>

#include "gtest/gtest.h"

namespace eellm::testing {

// <temp dir>/eellm_test_<pid>/<name>; the directory exists, name does not have to.
inline std::string ScratchPath(const std::string& name) {
  struct Dir {
    std::string path;
    Dir() : path(::testing::TempDir() + "/eellm_test_" + std::to_string(getpid())) {
      std::filesystem::create_directories(path);
    }
    ~Dir() {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  };
  static const Dir dir;
  return dir.path + "/" + name;
}

}  // namespace eellm::testing
