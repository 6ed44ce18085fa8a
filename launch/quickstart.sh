#!/usr/bin/env bash
# The main job on its embedded default, from a fresh machine: installs dependencies, builds,
# prepares the King James Bible as byte tokens, trains a small Llama-style early-exit model on
# the CPU (configs/kjv_demo.json), then generates with and without early exit and prints both
# speeds and the exit histogram, and with self-speculative decoding (drafts kept, speed).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
./launch/install_deps.sh
./launch/build.sh eellm
if [ ! -f data/kjv.train.bin ]; then
  mkdir -p data
  bible -l100000 "Gen1:1-Rev22:21" | sed -n 's/^ \+[0-9]\+ //p' > data/kjv.txt
  ./build/eellm data --input data/kjv.txt --output data/kjv --val-fraction 0.02
fi
./build/eellm train --config configs/kjv_demo.json "$@"
./build/eellm generate --checkpoint runs/kjv_demo --prompt "And God said" \
  --max-new-tokens 200 --threshold 0.8 --compare
# Self-speculative decoding: the exit after layer 4 drafts, the full model checks; the text is the
# full model's.
./build/eellm generate --checkpoint runs/kjv_demo --prompt "And God said" \
  --max-new-tokens 200 --draft-exit 4 --draft-tokens 4 --compare
echo "quickstart finished in $(( $(date +%s) - start )) s"
