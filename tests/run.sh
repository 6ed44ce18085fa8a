#!/usr/bin/env bash
# Installs dependencies (when missing), builds everything, and runs all tests with ctest.
# Extra arguments go to ctest (e.g. -L unit, -R Generator).
set -euo pipefail
cd "$(dirname "$0")/.."
./launch/install_deps.sh --tests
./launch/build.sh
cd build
ctest --output-on-failure -j"$(nproc)" --timeout 600 "$@"
