// CpuBackend::AvailableMemoryBytes: the system's available memory (/proc/meminfo), or less when
// this process's cgroup (v2: a container, a Slurm job with --mem) limits it.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>

#include "engine/cpu/cpu_backend.h"

namespace eellm {

int64_t CpuBackend::AvailableMemoryBytes() const {
  int64_t available = -1;
  std::ifstream meminfo("/proc/meminfo");
  for (std::string line; std::getline(meminfo, line);) {
    long long kb = 0;
    if (std::sscanf(line.c_str(), "MemAvailable: %lld kB", &kb) == 1) available = kb * 1024;
  }
  // The cgroup is "0::<path>" in /proc/self/cgroup. A limit may sit on it or on any group above
  // it (Slurm sets --mem on the job's group, above the task's): each group's limit less what it
  // uses beyond page cache the kernel reclaims (inactive_file, as the kubelet counts); "max"
  // means none.
  std::string group;
  std::ifstream self("/proc/self/cgroup");
  for (std::string line; std::getline(self, line);) {
    if (line.rfind("0::", 0) == 0) group = line.substr(3);
  }
  for (;;) {
    const std::string dir = "/sys/fs/cgroup" + group;
    std::ifstream max_file(dir + "/memory.max"), current_file(dir + "/memory.current");
    long long max = 0, current = 0;
    if ((max_file >> max) && (current_file >> current)) {
      std::ifstream stat(dir + "/memory.stat");
      std::string key;
      long long value = 0, inactive_file = 0;
      while (stat >> key >> value) {
        if (key == "inactive_file") inactive_file = value;
      }
      const int64_t free = std::max<long long>(max - (current - inactive_file), 0);
      available = available < 0 ? free : std::min(available, free);
    }
    const size_t slash = group.rfind('/');
    if (group.empty() || slash == std::string::npos) break;
    group.resize(slash);  // the parent ("/a/b" -> "/a" -> "")
  }
  return available;
}

}  // namespace eellm
