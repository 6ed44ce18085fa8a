#!/usr/bin/env bash
# Installs eellm's build and test dependencies from Debian packages when any is missing.
# Uses apt-get directly as root, or through sudo otherwise. Safe to run repeatedly.
# --tests: also what only the tests use.
set -euo pipefail
PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libopenblas-openmp-dev     # CPU GEMMs (cblas_sgemm), sharing our OpenMP thread pool
  libopenmpi-dev openmpi-bin # MPI launcher and communicator
  libhdf5-dev                # checkpoints
  libzip-dev                 # reading torch.save files (Megatron-LM / EE-LLM checkpoints)
  libabsl-dev                # Status/StatusOr, flags, strings
  nlohmann-json3-dev         # JSON configs
  libcpp-httplib-dev         # HTTP server (serving)
  libgtest-dev libgmock-dev  # tests
  bible-kjv bible-kjv-text   # the embedded default corpus (King James Bible)
)
if [ "${1:-}" = "--tests" ]; then
  PACKAGES+=(python3-h5py)   # tests: h5py reads sharded checkpoints as whole arrays
fi
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
