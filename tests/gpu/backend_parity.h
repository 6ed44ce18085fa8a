// The fixture of the backend parity suite (backend_parity_test.cc, attention_parity_test.cc):
// every op of engine/backend.h runs on the backend under test and on the CPU backend (the
// numerical oracle) with the same random inputs, and the results are compared element by element
// within the tolerances of parity_tolerances.h. See backend_parity_test.cc for the rules.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "engine/core/rng.h"
#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"
#include "tests/engine/cpu_test_util.h"
#include "tests/gpu/device_mem.h"
#include "tests/gpu/parity_backend.h"
#include "tests/gpu/parity_tolerances.h"

namespace eellm::parity {

using cpu_test::InRows;
using cpu_test::RandVec;
using cpu_test::UniformVec;

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

using testing::Close;
using testing::DeviceMem;
using testing::kElementwise;
using testing::kExact;
using testing::kGemmBf16;
using testing::kGemmFp32;
using testing::kReduction;
using testing::kRope;
using testing::Tol;
inline const Tol kGemm = testing::ParityBackendHasBf16Gemms() ? kGemmBf16 : kGemmFp32;

// Named host copies of an op call's outputs.
using Outputs = std::vector<std::pair<std::string, std::vector<float>>>;
// Uploads the inputs, runs one op on `be` and reads its outputs back.
using OpRun = std::function<Outputs(Backend* be, DeviceMem& m)>;

class BackendParity : public testing::DeviceParityTest {
 protected:
  // Runs `op` on the CPU and on the backend under test; every output must match within `tol`
  // and no buffer may be written past its end.
  void ExpectParity(const OpRun& op, Tol tol) {
    Outputs want, got;
    {
      DeviceMem m(&ref_);
      want = op(&ref_, m);
      EXPECT_TRUE(m.GuardsIntact()) << "on the CPU";
    }
    {
      DeviceMem m(dev_);
      got = op(dev_, m);
      EXPECT_TRUE(m.GuardsIntact()) << "on " << dev_->name();
    }
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(Close(got[i].second, want[i].second, tol)) << want[i].first;
    }
  }

  std::vector<int32_t> Ids(int n, int below) {
    std::vector<int32_t> ids(n);
    for (auto& x : ids) x = static_cast<int32_t>(rng_.Below(below));
    return ids;
  }

  CpuBackend ref_;
  Rng rng_{20240607};
};

}  // namespace eellm::parity
