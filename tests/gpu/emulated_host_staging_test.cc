// The CUDA backend's CopyFromHost through its pinned ring (engine/cuda/host_staging.h), under
// the CPU emulation of CUDA, which defers an asynchronous copy from pinned memory until the next
// operation that could observe it: every copy lands intact although the host reuses its source
// at once and the ring wraps several times (a region written again before its copy completed
// would corrupt that copy), and ops after a copy see its bytes.
#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "tests/gpu/emu/emulated_cuda_backend.h"

namespace eellm {
namespace {

std::vector<uint8_t> Pattern(size_t bytes, int seed) {
  std::vector<uint8_t> v(bytes);
  for (size_t i = 0; i < bytes; ++i) v[i] = static_cast<uint8_t>((i * 131 + seed * 7 + 1) % 251);
  return v;
}

TEST(EmulatedHostStaging, CopiesLandIntactThroughTheRingAndItsWraps) {
  auto made = MakeEmulatedCudaBackend(0, false);
  ASSERT_TRUE(made.ok()) << made.status();
  Backend* be = made->get();
  // 1 MiB is the most staged (1 MiB + 4 goes directly, after the staged ones have landed). 81
  // copies of these move ~23 MiB through the 8 MiB ring, the first 80 with nothing in between
  // that would complete them, so the ring wraps twice onto copies still in flight (the second
  // time with older copies left at its end).
  const size_t sizes[] = {4, 1000, size_t{1} << 20, 64 * 1024 + 3, 333333};
  std::vector<void*> dev;
  std::vector<size_t> bytes;
  std::vector<uint8_t> src;  // one host buffer, reused for every copy
  for (int i = 0; i < 81; ++i) {
    const size_t n = i < 80 ? sizes[i % 5] : (size_t{1} << 20) + 4;
    dev.push_back(be->Alloc(n));
    bytes.push_back(n);
    src = Pattern(n, i);
    be->CopyFromHost(dev.back(), src.data(), n);
    std::memset(src.data(), 0xFF, n);  // the source may change once CopyFromHost returns
    if (i == 78) {
      // The emulation defers the staged copies: this one has not landed yet.
      EXPECT_NE(std::memcmp(dev.back(), Pattern(n, i).data(), n), 0);
    }
  }
  for (int i = 0; i < 81; ++i) {
    std::vector<uint8_t> got(bytes[i]);
    be->CopyToHost(got.data(), dev[i], bytes[i]);
    EXPECT_EQ(got, Pattern(bytes[i], i)) << "copy " << i << " of " << bytes[i] << " bytes";
  }
  // An op after a copy to the same memory sees the copy's bytes first and overwrites them.
  std::vector<float> ones(256, 1.0f), got(256);
  auto* x = static_cast<float*>(be->Alloc(256 * sizeof(float)));
  be->CopyFromHost(x, ones.data(), 256 * sizeof(float));
  be->Scale(x, 3.0f, 128);
  be->CopyToHost(got.data(), x, 256 * sizeof(float));
  for (int i = 0; i < 256; ++i) ASSERT_EQ(got[i], i < 128 ? 3.0f : 1.0f) << i;
  be->Free(x);
  for (void* p : dev) be->Free(p);
}

}  // namespace
}  // namespace eellm
