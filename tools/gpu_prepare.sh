#!/usr/bin/env bash
# Run on the development machine before a GPU session: ../shared/gpu/prepare.sh fills .gpu/
# (git-ignored) with Debian packages the GPU machine lacks; this adds OpenBLAS (the CPU
# backend's GEMMs, which the GPU machine lacks too) and its Fortran runtime. Carry ".gpu" with
# every GPU run and begin the command with `source .gpu/env.sh &&` (it unpacks every .deb in
# .gpu/debs into /opt/gpu-deps; CMake finds OpenBLAS there through CMAKE_PREFIX_PATH). Also
# copies the KJV text of the quickstart into .gpu/kjv.txt for the end-to-end demo run.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash ../shared/gpu/prepare.sh
cd .gpu/debs
# libzip reads torch.save files (checkpoints/); cpp-httplib's header wants OpenSSL's (the
# library beside them so that libssl.so's link resolves inside /opt/gpu-deps).
PKGS="libopenblas-openmp-dev libopenblas0-openmp libgfortran5 libzip-dev libzip4 libssl-dev libssl3"
if ! ls libzip4_*.deb libopenblas0-openmp_*.deb libssl-dev_*.deb >/dev/null 2>&1; then
  apt-get download $PKGS >/dev/null 2>&1 || { apt-get update -qq && apt-get download $PKGS; }
fi
cd ../..
# Debian keeps OpenSSL's configuration headers under the multiarch include directory.
grep -q "CPATH=" .gpu/env.sh ||
  echo 'export CPATH=/opt/gpu-deps/usr/include/x86_64-linux-gnu${CPATH:+:$CPATH}' >> .gpu/env.sh
# The demo's corpus for gpu_check.sh's end-to-end run (the GPU machine has no bible-kjv).
if [ ! -f .gpu/kjv.txt ]; then
  if [ -f data/kjv.txt ]; then
    cp data/kjv.txt .gpu/kjv.txt
  elif command -v bible >/dev/null; then
    bible -l100000 "Gen1:1-Rev22:21" | sed -n 's/^ \+[0-9]\+ //p' > .gpu/kjv.txt
  fi
fi
echo "ready: $(ls .gpu/debs | wc -l) packages in .gpu/debs (OpenBLAS included)" \
  "$([ -f .gpu/kjv.txt ] && echo "and the KJV text")"
