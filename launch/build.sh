#!/usr/bin/env bash
# Configures and builds eellm into ./build (Release). Extra arguments name build targets.
set -euo pipefail
cd "$(dirname "$0")/.."
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
if [ ! -f build/CMakeCache.txt ]; then
  cmake -S . -B build "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
TARGETS=()
for t in "$@"; do TARGETS+=(--target "$t"); done
cmake --build build -j"$(nproc)" "${TARGETS[@]}"
