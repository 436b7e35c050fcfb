"""Tokenizer, corpora, the held-out split and the grain pipelines that feed training and evaluation.

A corpus is a list of documents turned into two token streams, `train_N` and `eval_N`, split by whole document
so held-out loss is measured on text the model never trained on. Corpora (the `data` spec):
  'stdlib'             the Python standard library source of the running interpreter (default; no download)
  'stdlib-full'        the same plus its test suite and optional packages (more text; not on every install)
  'tinystories'        TinyStories V2 (GPT-4) train file, downloaded once into the cache (~2.2 GB)
  'tinystories-valid'  its small validation file (~22 MB), downloaded once
  a path, directory or glob of text files (byte tokenizer), or of pre-tokenized `.npy` / `.bin` token files
  (`.bin` is raw little-endian uint16, nanoGPT's format, or uint32 when the name ends in `.u32.bin`).
Text corpora are byte tokens unless a Hugging Face `tokenizer.json` is given (`load_corpus(tokenizer=...)`,
through the `tokenizers` package): then each document is its tokens plus the tokenizer's end-of-text token.

Shape letters: slmjax/shapes.py (here N tokens of a stream, B batch per process, T sequence length; a window is T + 1
tokens).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile
import urllib.request

import grain
import numpy as np

from slmjax import atomic

EOT = 0  # byte tokenizer: ends every text document (NUL does not occur in text)
DOC_SEPARATOR = b'<|endoftext|>'  # text files holding several documents separate them with this marker
MIN_DOCUMENTS = 100  # fewer documents than this (e.g. one big file): cut each into pieces so a split exists
CACHE_FORMAT = 1
TINYSTORIES_URL = 'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/'
TINYSTORIES_FILES = {'tinystories': 'TinyStoriesV2-GPT4-train.txt',
                     'tinystories-valid': 'TinyStoriesV2-GPT4-valid.txt'}
# Parts of the standard library that some installs leave out (Debian ships tests, tkinter, idle, lib2to3 and
# distutils as separate packages) or that describe the build machine; 'stdlib' skips them so every install of
# one CPython version yields the same bytes.
STDLIB_OPTIONAL = {'test', 'tests', 'idlelib', 'tkinter', 'turtledemo', 'lib2to3', 'distutils', 'ensurepip'}
STDLIB_NEVER = {'site-packages', 'dist-packages', '__pycache__'}


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocab 256): no training, no unknown tokens, loss in bits per byte is comparable."""

  vocab_size = 256
  eot = EOT

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).copy()

  def decode(self, tokens) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8)).decode('utf-8', errors='replace')


EOT_NAMES = ('<|endoftext|>', '</s>', '<eos>', '<|end_of_text|>')  # a tokenizer's end-of-text token, first found


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` package, an optional dependency: pip install tokenizers)."""

  def __init__(self, path: str | os.PathLike):
    try:
      import tokenizers  # optional: only models imported from Hugging Face need it
    except ImportError:
      raise ValueError(f'tokenizer {path} needs the tokenizers package: pip install tokenizers') from None
    if not os.path.isfile(path):
      raise ValueError(f'tokenizer {path} does not exist (give a tokenizer.json file)')
    self.path = str(path)
    self.tokenizer = tokenizers.Tokenizer.from_file(self.path)
    self.vocab_size = self.tokenizer.get_vocab_size()
    self.eot = next((i for i in map(self.tokenizer.token_to_id, EOT_NAMES) if i is not None), None)

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, tokens) -> str:
    return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and held-out token streams, split by document; `*_docs` are the documents' SHA-1 content hashes."""

  name: str
  tokenizer: str  # 'bytes' (loss / ln 2 is bits per byte) or 'pretokenized'
  train_N: np.ndarray
  eval_N: np.ndarray
  train_docs: tuple[str, ...]
  eval_docs: tuple[str, ...]
  fingerprint: str  # SHA-1 over every document, in order: equal fingerprints mean equal data
  eval_bytes: int = 0  # UTF-8 bytes the held-out tokens decode to (a tokenizer's corpus): for bits per byte

  @property
  def max_token(self) -> int:
    return int(max(self.train_N.max(initial=0), self.eval_N.max(initial=0)))

  def unigram_loss(self) -> float:
    """Cross-entropy (nats/token) of the held-out stream under the train unigram distribution (add-one)."""
    V = self.max_token + 1
    counts = np.bincount(self.train_N, minlength=V).astype(np.float64) + 1.0
    eval_counts = np.bincount(self.eval_N, minlength=V).astype(np.float64)
    return float(-np.sum(eval_counts * np.log(counts / counts.sum())) / eval_counts.sum())

  def summary(self) -> dict:
    return {'data': self.name, 'tokenizer': self.tokenizer, 'train_tokens': int(self.train_N.size),
            'eval_tokens': int(self.eval_N.size), 'train_documents': len(self.train_docs),
            'eval_documents': len(self.eval_docs), 'data_fingerprint': self.fingerprint,
            **({'eval_bytes': self.eval_bytes} if self.eval_bytes else {})}


def cache_dir() -> pathlib.Path:
  """$SLMJAX_CACHE_DIR, else $XDG_CACHE_HOME/slmjax, else ~/.cache/slmjax."""
  if os.environ.get('SLMJAX_CACHE_DIR'):
    return pathlib.Path(os.environ['SLMJAX_CACHE_DIR'])
  return pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache')) / 'slmjax'


# Reading documents.
def stdlib_files(full: bool = False) -> list[pathlib.Path]:
  """The `.py` files of the running interpreter's standard library, sorted by relative path."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  skip = STDLIB_NEVER | (set() if full else STDLIB_OPTIONAL)
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    here = pathlib.Path(dirpath)
    dirnames[:] = [d for d in dirnames if d not in skip and not (here == root and d.startswith('config-'))]
    files += [here / f for f in filenames if f.endswith('.py') and not f.startswith('_sysconfigdata')]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_text(data: bytes) -> list[bytes]:
  """Documents of one text file: pieces between `<|endoftext|>` markers, stripped, empty ones dropped."""
  return [doc.strip() for doc in data.split(DOC_SEPARATOR) if doc.strip()]


def parse_tinystories(path: str | os.PathLike) -> list[bytes]:
  """TinyStories text files hold one story per `<|endoftext|>`-separated piece."""
  return split_text(pathlib.Path(path).read_bytes())


def text_pieces(paths: list[pathlib.Path]) -> list[bytes]:
  """The documents of text files: a file is one document unless it holds separators."""
  docs = []
  for path in paths:
    data = path.read_bytes()
    docs += [piece for piece in (split_text(data) if DOC_SEPARATOR in data else [data]) if piece]
  return docs


def text_documents(paths: list[pathlib.Path]) -> list[np.ndarray]:
  """Byte-tokenized documents, each ending in EOT."""
  return [np.frombuffer(piece + bytes([EOT]), dtype=np.uint8) for piece in text_pieces(paths)]


def read_token_file(path: str | os.PathLike) -> np.ndarray:
  """A 1-D uint16/uint32 token array from `.npy`, or from raw `.bin` (uint16; `.u32.bin` means uint32)."""
  path = pathlib.Path(path)
  if path.suffix == '.npy':
    tokens = np.load(path, mmap_mode='r')
  else:
    dtype = np.uint32 if path.name.endswith(('.u32.bin', '.uint32.bin')) else np.uint16
    size = path.stat().st_size
    if size % np.dtype(dtype).itemsize:
      raise ValueError(f'{path}: {size} bytes is not a whole number of {np.dtype(dtype).name} tokens')
    tokens = np.memmap(path, dtype=dtype, mode='r') if size else np.zeros(0, dtype)
  if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
    raise ValueError(f'{path}: token files must be 1-D uint16 or uint32, got {tokens.dtype} {tokens.shape}')
  return tokens


def resolve_paths(spec: str) -> list[pathlib.Path]:
  """Files named by a path, a directory (every non-hidden file below it) or a glob; sorted, so the order is
  stable."""
  expanded = os.path.expanduser(spec)
  if os.path.isdir(expanded):
    root = pathlib.Path(expanded)
    paths = [p for p in root.rglob('*') if p.is_file() and not any(part.startswith('.') for part in
                                                                    p.relative_to(root).parts)]
  else:
    paths = [pathlib.Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
  if not paths:
    raise ValueError(f'data {spec!r}: no such file, directory or glob match (named corpora: '
                     f'stdlib, stdlib-full, {", ".join(TINYSTORIES_FILES)})')
  return sorted(paths)


def download(url: str, dest: pathlib.Path) -> pathlib.Path:
  """Fetch `url` into `dest` once (written to a temporary name, then renamed, so it is never half there)."""
  if dest.exists():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  print(f'downloading {url} -> {dest}', file=sys.stderr)
  try:
    with atomic.replacing(dest) as tmp, tmp.open('wb') as f:
      with urllib.request.urlopen(url, timeout=60) as response:
        shutil.copyfileobj(response, f, length=1 << 20)
  except OSError as e:
    raise ValueError(f'cannot download {url}: {e}; without network use --data=stdlib or local files') from e
  return dest


# Splitting documents into train and held-out.
def split_documents(docs: list[np.ndarray], eval_fraction: float) -> tuple[list[int], list[int], list[str]]:
  """Indices of the train and eval documents, and every document's content hash.

  Exact duplicates are dropped first (so no document can sit on both sides); the eval documents are the
  round(eval_fraction * n) with the smallest SHA-1 of their content: deterministic, independent of file names
  and order, at least one on each side.
  """
  hashes, keep, seen = [], [], set()
  for i, doc in enumerate(docs):
    digest = hashlib.sha1(np.ascontiguousarray(doc).tobytes()).hexdigest()
    hashes.append(digest)
    if doc.size and digest not in seen:
      seen.add(digest)
      keep.append(i)
  if len(keep) < 2:
    raise ValueError(f'corpus has {len(keep)} non-empty document(s); a held-out split needs at least 2')
  n_eval = min(len(keep) - 1, max(1, round(eval_fraction * len(keep))))
  by_hash = sorted(keep, key=lambda i: hashes[i])
  eval_set = set(by_hash[:n_eval])
  return [i for i in keep if i not in eval_set], [i for i in keep if i in eval_set], hashes


def cut_documents(docs: list[np.ndarray], minimum: int = MIN_DOCUMENTS) -> list[np.ndarray]:
  """When there are fewer than `minimum` documents, cut each into contiguous pieces (about `minimum` in all)."""
  if len(docs) >= minimum:
    return docs
  per_doc = -(-minimum // max(1, len(docs)))
  return [piece for doc in docs for piece in np.array_split(doc, min(per_doc, max(1, doc.size))) if piece.size]


def build_corpus(name: str, tokenizer: str, docs: list[np.ndarray], eval_fraction: float) -> Corpus:
  docs = cut_documents(docs)
  if sum(d.size for d in docs) == 0:
    raise ValueError(f'data {name!r} is empty (0 tokens)')
  train_idx, eval_idx, hashes = split_documents(docs, eval_fraction)
  dtype = np.result_type(*[d.dtype for d in docs])
  stream = lambda idx: np.concatenate([docs[i] for i in idx]).astype(dtype, copy=False)
  fingerprint = hashlib.sha1(''.join(hashes).encode()).hexdigest()
  return Corpus(name, tokenizer, stream(train_idx), stream(eval_idx), tuple(hashes[i] for i in train_idx),
                tuple(hashes[i] for i in eval_idx), fingerprint)


# Loading (with an on-disk cache for the named corpora).
def load_corpus(spec: str = 'stdlib', eval_fraction: float = 0.05, use_cache: bool = True,
                tokenizer: str = '') -> Corpus:
  """The corpus a `data` spec names (see the module docstring), split into train and held-out streams;
  `tokenizer`: a tokenizer.json to tokenize its text with instead of bytes (not cached: tokenizers is fast)."""
  if not 0 < eval_fraction < 1:
    raise ValueError(f'eval_fraction must be in (0, 1), got {eval_fraction}')
  if tokenizer:
    return tokenized_corpus(spec, eval_fraction, HFTokenizer(tokenizer))
  if spec in ('stdlib', 'stdlib-full'):
    files = stdlib_files(full=spec == 'stdlib-full')
    stats = [(p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = _cache_key(spec, sys.version, stats, eval_fraction)
    return _cached(key, lambda: build_corpus(spec, 'bytes', text_documents(files), eval_fraction), use_cache)
  if spec in TINYSTORIES_FILES:
    path = download(TINYSTORIES_URL + TINYSTORIES_FILES[spec], cache_dir() / 'downloads' / TINYSTORIES_FILES[spec])
    key = _cache_key(spec, path.stat().st_size, path.stat().st_mtime_ns, eval_fraction)
    build = lambda: build_corpus(spec, 'bytes', [np.frombuffer(d + bytes([EOT]), np.uint8)
                                                 for d in parse_tinystories(path)], eval_fraction)
    return _cached(key, build, use_cache)
  paths = resolve_paths(spec)
  token_files = [p.suffix in ('.npy', '.bin') for p in paths]
  if any(token_files) and not all(token_files):
    raise ValueError(f'data {spec!r} mixes token files (.npy/.bin) with text files; name one kind')
  if all(token_files):
    return build_corpus(spec, 'pretokenized', [read_token_file(p) for p in paths], eval_fraction)
  return build_corpus(spec, 'bytes', text_documents(paths), eval_fraction)


def tokenized_corpus(spec: str, eval_fraction: float, tokenizer: HFTokenizer) -> Corpus:
  """The text corpus `spec` in `tokenizer`'s tokens (each document ends in its end-of-text token, if any)."""
  if spec in ('stdlib', 'stdlib-full'):
    pieces = text_pieces(stdlib_files(full=spec == 'stdlib-full'))
  elif spec in TINYSTORIES_FILES:
    pieces = parse_tinystories(download(TINYSTORIES_URL + TINYSTORIES_FILES[spec],
                                        cache_dir() / 'downloads' / TINYSTORIES_FILES[spec]))
  else:
    paths = resolve_paths(spec)
    if any(p.suffix in ('.npy', '.bin') for p in paths):
      raise ValueError(f'data {spec!r} is pre-tokenized; a tokenizer applies to text data only')
    pieces = text_pieces(paths)
  end = [] if tokenizer.eot is None else [tokenizer.eot]
  texts = [p.decode('utf-8', errors='replace') for p in pieces]
  docs = [np.asarray(e.ids + end, dtype=np.int32)
          for e in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)]
  corpus = build_corpus(spec, f'hf:{os.path.basename(tokenizer.path)}', docs, eval_fraction)
  return dataclasses.replace(corpus, eval_bytes=len(tokenizer.decode(corpus.eval_N).encode('utf-8')))


def _cache_key(*parts) -> str:
  return f'{parts[0]}-{hashlib.sha1(repr((CACHE_FORMAT,) + parts).encode()).hexdigest()[:16]}'


def _cached(key: str, build, use_cache: bool) -> Corpus:
  """Load a built corpus from the cache, or build it and store it (temporary directory, then rename)."""
  directory = cache_dir() / 'corpora' / key
  if use_cache and (directory / 'meta.json').exists():
    meta = json.loads((directory / 'meta.json').read_text())
    arrays = {s: np.load(directory / f'{s}.npy', mmap_mode='r') for s in ('train', 'eval')}
    return Corpus(meta['name'], meta['tokenizer'], arrays['train'], arrays['eval'], tuple(meta['train_docs']),
                  tuple(meta['eval_docs']), meta['fingerprint'])
  corpus = build()
  if use_cache:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f'.{key}-'))
    np.save(tmp / 'train.npy', corpus.train_N)
    np.save(tmp / 'eval.npy', corpus.eval_N)
    meta = {'name': corpus.name, 'tokenizer': corpus.tokenizer, 'train_docs': corpus.train_docs,
            'eval_docs': corpus.eval_docs, 'fingerprint': corpus.fingerprint}
    (tmp / 'meta.json').write_text(json.dumps(meta))
    try:
      os.rename(tmp, directory)
    except OSError:  # another process stored it first
      shutil.rmtree(tmp, ignore_errors=True)
  return corpus


# grain pipelines.
def check_length(tokens_N: np.ndarray, seq_len: int, split: str) -> None:
  if tokens_N.size < seq_len + 1:
    raise ValueError(f'seq_len={seq_len} is larger than the {split} data ({tokens_N.size} tokens); '
                     f'use a shorter --seq_len or more data')


def train_dataset(tokens_N: np.ndarray, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Endless batches [B, T+1] (int32) of random windows; this process's share of every global batch.

  Each epoch visits the T-token tiles of the stream in a seeded random order (reshuffled every epoch), and each
  window starts at a seeded random offset inside its tile, so windows do not repeat from epoch to epoch.
  Element i of the global window sequence goes to process i % process_count: global batch b is the same
  windows whatever the number of processes. The iterator's state (`get_state()`) is one index.
  """
  check_length(tokens_N, seq_len, 'train')
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by the {process_count} processes')
  n_tiles = (tokens_N.size - 1) // seq_len
  last_start = tokens_N.size - seq_len - 1

  def window(tile, rng: np.random.Generator) -> np.ndarray:
    start = min(int(tile) * seq_len + int(rng.integers(seq_len)), last_start)
    return np.asarray(tokens_N[start:start + seq_len + 1], dtype=np.int32)

  ds = grain.MapDataset.range(n_tiles).shuffle(seed=seed).repeat(None).random_map(window, seed=seed + 1)
  return ds[process_index::process_count].batch(batch_size // process_count, drop_remainder=True)


def train_iterator(ds: grain.MapDataset) -> grain.DatasetIterator:
  """An iterator with `get_state()` / `set_state()`, prefetching batches in a background thread."""
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def eval_batches(tokens_N: np.ndarray, seq_len: int, batch_size: int, n_batches: int) -> np.ndarray:
  """The fixed held-out windows [n_batches, B, T+1] (int32), spread evenly over the whole eval stream."""
  check_length(tokens_N, seq_len, 'held-out')
  starts = np.linspace(0, tokens_N.size - seq_len - 1, n_batches * batch_size).astype(np.int64)
  windows = np.stack([np.asarray(tokens_N[s:s + seq_len + 1], dtype=np.int32) for s in starts])
  return windows.reshape(n_batches, batch_size, seq_len + 1)
