#include "launch/tensorboard_events.h"

#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace eellm {
namespace {

constexpr std::array<uint32_t, 256> Crc32cTable() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrc32c = Crc32cTable();

uint32_t MaskedCrc(const void* data, size_t n) {
  const uint32_t crc = Crc32c(data, n);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

// ---- protocol buffer wire format: the few pieces events need ----------------------------------
void Varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void Fixed(std::string& out, const void* p, size_t n) {  // little-endian hosts
  out.append(static_cast<const char*>(p), n);
}
void Bytes(std::string& out, int field, const std::string& bytes) {
  Varint(out, (static_cast<uint64_t>(field) << 3) | 2);
  Varint(out, bytes.size());
  out += bytes;
}

// A cursor over one message's bytes.
struct Wire {
  const uint8_t* p;
  const uint8_t* end;
  bool ok = true;
  bool More() const { return ok && p < end; }
  uint64_t ReadVarint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) break;
      const uint8_t b = *p++;
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    ok = false;
    return 0;
  }
  // Reads a field's key and hands its value: varint in `v`, fixed and length-delimited bytes in
  // [*data, *data + *size).
  int Next(int* wire_type, uint64_t* v, const uint8_t** data, size_t* size) {
    const uint64_t key = ReadVarint();
    *wire_type = static_cast<int>(key & 7);
    size_t n = 0;
    switch (*wire_type) {
      case 0:
        *v = ReadVarint();
        return static_cast<int>(key >> 3);
      case 1:
        n = 8;
        break;
      case 5:
        n = 4;
        break;
      case 2:
        n = ReadVarint();
        break;
      default:
        ok = false;
        return 0;
    }
    if (!ok || n > static_cast<size_t>(end - p)) {
      ok = false;
      return 0;
    }
    *data = p;
    *size = n;
    p += n;
    return static_cast<int>(key >> 3);
  }
};

// Appends the scalars of an Event message; false when it cannot be decoded.
bool DecodeEvent(const uint8_t* data, size_t n, std::vector<TensorBoardScalar>& out) {
  Wire event{data, data + n};
  int64_t step = 0;
  std::vector<TensorBoardScalar> found;
  while (event.More()) {
    int type;
    uint64_t v = 0;
    const uint8_t* d = nullptr;
    size_t size = 0;
    const int field = event.Next(&type, &v, &d, &size);
    if (field == 2 && type == 0) step = static_cast<int64_t>(v);
    if (field != 5 || type != 2) continue;
    Wire summary{d, d + size};
    while (summary.More()) {
      const int f = summary.Next(&type, &v, &d, &size);
      if (f != 1 || type != 2) continue;
      Wire value{d, d + size};
      TensorBoardScalar s;
      bool has_value = false;
      while (value.More()) {
        const int g = value.Next(&type, &v, &d, &size);
        if (g == 1 && type == 2) s.tag.assign(reinterpret_cast<const char*>(d), size);
        if (g == 2 && type == 5) {
          std::memcpy(&s.value, d, 4);
          has_value = true;
        }
      }
      if (!value.ok) return false;
      if (has_value) found.push_back(std::move(s));
    }
    if (!summary.ok) return false;
  }
  if (!event.ok) return false;
  for (TensorBoardScalar& s : found) {
    s.step = step;
    out.push_back(std::move(s));
  }
  return true;
}

}  // namespace

uint32_t Crc32c(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; ++i) c = kCrc32c[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

absl::StatusOr<TensorBoardEvents> TensorBoardEvents::Open(const std::string& dir,
                                                          int64_t first_step) {
  static std::atomic<int> opened{0};
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  char host[256] = "localhost";
  gethostname(host, sizeof(host) - 1);
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  TensorBoardEvents e;
  std::FILE* f = nullptr;
  for (int attempt = 0; attempt < 100 && f == nullptr; ++attempt) {
    e.path_ = (std::filesystem::path(dir) /
               absl::StrCat("events.out.tfevents.",
                            std::chrono::duration_cast<std::chrono::seconds>(now).count(), ".",
                            host, ".", getpid(), ".", opened++))
                  .string();
    f = std::fopen(e.path_.c_str(), "wbx");  // never an existing file
    if (f == nullptr && errno != EEXIST) break;
  }
  if (f == nullptr) {
    return absl::PermissionDeniedError(absl::StrCat("cannot write the TensorBoard event file ",
                                                    e.path_, ": ", std::strerror(errno)));
  }
  e.file_ = std::shared_ptr<std::FILE>(f, [](std::FILE* p) { std::fclose(p); });
  std::string event;
  const double wall = std::chrono::duration<double>(now).count();
  Varint(event, (1 << 3) | 1);
  Fixed(event, &wall, 8);
  Bytes(event, 3, "brain.Event:2");
  e.Record(event);
  if (first_step > 0) {
    // The validation at first_step repeats the crashed run's (same weights, same value); its
    // training point at first_step stays.
    std::string start;
    Varint(start, (1 << 3) | 1);
    Fixed(start, &wall, 8);
    Varint(start, 2 << 3);
    Varint(start, static_cast<uint64_t>(first_step + 1));
    Bytes(start, 6, std::string("\x08\x01", 2));  // SessionLog { status: START }
    e.Record(start);
  }
  std::fflush(f);
  return e;
}

void TensorBoardEvents::Write(int64_t step,
                              const std::vector<std::pair<std::string, float>>& scalars) {
  if (!file_) return;
  std::string summary;
  for (const auto& [tag, value] : scalars) {
    std::string v;
    Bytes(v, 1, tag);
    Varint(v, (2 << 3) | 5);
    Fixed(v, &value, 4);
    Bytes(summary, 1, v);
  }
  const double wall =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::string event;
  Varint(event, (1 << 3) | 1);
  Fixed(event, &wall, 8);
  Varint(event, 2 << 3);
  Varint(event, static_cast<uint64_t>(step));
  Bytes(event, 5, summary);
  Record(event);
  std::fflush(file_.get());
}

void TensorBoardEvents::Record(const std::string& data) {
  const uint64_t n = data.size();
  const uint32_t len_crc = MaskedCrc(&n, 8), data_crc = MaskedCrc(data.data(), data.size());
  std::fwrite(&n, 8, 1, file_.get());
  std::fwrite(&len_crc, 4, 1, file_.get());
  std::fwrite(data.data(), 1, data.size(), file_.get());
  std::fwrite(&data_crc, 4, 1, file_.get());
}

absl::StatusOr<std::vector<TensorBoardScalar>> ReadTensorBoardScalars(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<TensorBoardScalar> out;
  size_t at = 0;
  auto bad = [&](const std::string& what) {
    return absl::DataLossError(absl::StrCat(path, ": record at byte ", at, ": ", what));
  };
  while (at < bytes.size()) {
    if (bytes.size() - at < 12) return bad("truncated header");
    uint64_t n = 0;
    uint32_t crc = 0;
    std::memcpy(&n, bytes.data() + at, 8);
    std::memcpy(&crc, bytes.data() + at + 8, 4);
    if (crc != MaskedCrc(bytes.data() + at, 8)) return bad("length CRC mismatch");
    if (n > bytes.size() - at - 12 || bytes.size() - at - 12 - n < 4) return bad("truncated data");
    const char* data = bytes.data() + at + 12;
    std::memcpy(&crc, data + n, 4);
    if (crc != MaskedCrc(data, n)) return bad("data CRC mismatch");
    if (!DecodeEvent(reinterpret_cast<const uint8_t*>(data), n, out)) {
      return bad("not a valid Event");
    }
    at += 12 + n + 4;
  }
  return out;
}

}  // namespace eellm
