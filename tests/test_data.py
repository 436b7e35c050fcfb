"""Corpora, the document-level held-out split, token files, TinyStories parsing and the grain pipeline."""

import hashlib
import os
import urllib.request

import numpy as np
import pytest

from slmjax import data


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
  """A private corpus cache for the test session (never the user's ~/.cache)."""
  directory = tmp_path_factory.getbasetemp() / 'slmjax-cache'
  monkeypatch.setenv('SLMJAX_CACHE_DIR', str(directory))
  return directory


def sha1(tokens) -> str:
  return hashlib.sha1(np.ascontiguousarray(tokens).tobytes()).hexdigest()


def test_byte_tokenizer_round_trip():
  tok = data.ByteTokenizer()
  text = 'héllo wörld → ✓'
  ids = tok.encode(text)
  assert ids.dtype == np.uint8 and ids.size == len(text.encode())
  assert tok.decode(ids) == text


def test_split_is_by_document_deterministic_and_disjoint():
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 256, rng.integers(5, 50)).astype(np.uint8) for _ in range(200)]
  docs += [docs[3].copy(), docs[7].copy()]  # exact duplicates must not straddle the split
  train_idx, eval_idx, hashes = data.split_documents(docs, 0.1)
  train_h, eval_h = {hashes[i] for i in train_idx}, {hashes[i] for i in eval_idx}
  assert not train_h & eval_h
  assert len(eval_idx) == 20 and len(train_idx) == 180  # duplicates dropped, 10% of 200 unique held out
  assert train_h | eval_h == set(hashes)
  # The choice depends on content only: shuffling the document order holds out the same documents.
  order = rng.permutation(len(docs))
  _, eval_idx2, hashes2 = data.split_documents([docs[i] for i in order], 0.1)
  assert {hashes2[i] for i in eval_idx2} == eval_h


def test_stdlib_corpus_held_out_files_never_in_training(cache):
  corpus = data.load_corpus('stdlib', use_cache=False)
  assert corpus.tokenizer == 'bytes' and corpus.train_N.size > 5_000_000 and corpus.eval_N.size > 100_000
  assert not set(corpus.train_docs) & set(corpus.eval_docs)
  # Re-derive from the files: each non-empty file's content is on exactly one side.
  files = data.stdlib_files()
  hashes = {sha1(np.frombuffer(p.read_bytes() + b'\0', np.uint8)) for p in files if p.stat().st_size}
  assert hashes == set(corpus.train_docs) | set(corpus.eval_docs)
  # The streams are exactly the documents of their side (each ends with the EOT byte).
  assert np.count_nonzero(np.asarray(corpus.train_N) == data.EOT) == len(corpus.train_docs)
  assert np.count_nonzero(np.asarray(corpus.eval_N) == data.EOT) == len(corpus.eval_docs)
  # A held-out file's text does not occur in the training stream.
  train_bytes = np.asarray(corpus.train_N).tobytes()
  for doc in bytes(np.asarray(corpus.eval_N)).split(b'\0')[:5]:
    assert doc and doc not in train_bytes
  # Unigram baseline: a real number of bits per byte for source code (between 4 and 6).
  assert 4 < corpus.unigram_loss() / np.log(2) < 6


def test_corpus_cache_round_trip(cache):
  built = data.load_corpus('stdlib')
  cached = data.load_corpus('stdlib')
  assert isinstance(cached.train_N, np.memmap)
  assert cached.fingerprint == built.fingerprint and cached.eval_docs == built.eval_docs
  np.testing.assert_array_equal(cached.eval_N, built.eval_N)
  assert not [p for p in (cache / 'corpora').iterdir() if p.name.startswith('.')]  # no temporary leftovers


@pytest.mark.parametrize('name,dtype,writer', [
    ('a.bin', np.uint16, lambda p, t: t.tofile(p)),
    ('a.u32.bin', np.uint32, lambda p, t: t.tofile(p)),
    ('a.npy', np.uint16, np.save),
    ('a.npy', np.uint32, np.save),
])
def test_token_files(tmp_path, name, dtype, writer):
  rng = np.random.default_rng(1)
  high = 70_000 if dtype == np.uint32 else 50_000
  shards = [rng.integers(0, high, 3000).astype(dtype) for _ in range(3)]
  for i, shard in enumerate(shards):
    writer(tmp_path / f'{i}{name}', shard)
  corpus = data.load_corpus(str(tmp_path / f'*{name}'))
  assert corpus.tokenizer == 'pretokenized' and corpus.train_N.dtype == dtype
  both = np.concatenate([corpus.train_N, corpus.eval_N])
  np.testing.assert_array_equal(np.sort(both), np.sort(np.concatenate(shards)))  # every token, once
  assert not set(corpus.train_docs) & set(corpus.eval_docs)


def test_token_file_errors(tmp_path):
  (tmp_path / 'odd.bin').write_bytes(b'\x01\x02\x03')
  with pytest.raises(ValueError, match='whole number'):
    data.load_corpus(str(tmp_path / 'odd.bin'))
  np.save(tmp_path / 'wide.npy', np.arange(10, dtype=np.int64))
  with pytest.raises(ValueError, match='uint16 or uint32'):
    data.load_corpus(str(tmp_path / 'wide.npy'))
  (tmp_path / 'mixed').mkdir()
  np.save(tmp_path / 'mixed' / 'a.npy', np.arange(10, dtype=np.uint16))
  (tmp_path / 'mixed' / 'b.txt').write_text('text')
  with pytest.raises(ValueError, match='mixes'):
    data.load_corpus(str(tmp_path / 'mixed'))


def test_bad_data_specs(tmp_path):
  with pytest.raises(ValueError, match='no such file'):
    data.load_corpus(str(tmp_path / 'nothing-here-*.txt'))
  (tmp_path / 'empty.txt').write_bytes(b'')
  with pytest.raises(ValueError, match='empty'):
    data.load_corpus(str(tmp_path / 'empty.txt'))


def test_one_text_file_is_cut_into_documents(tmp_path):
  path = tmp_path / 'book.txt'
  path.write_text(''.join(f'line {i} of a long book\n' for i in range(2000)))
  corpus = data.load_corpus(str(path))
  assert len(corpus.train_docs) + len(corpus.eval_docs) == data.MIN_DOCUMENTS
  assert corpus.train_N.size + corpus.eval_N.size == path.stat().st_size + 1  # + one EOT


TINY_STORIES = (b'Once upon a time there was a cat.\n<|endoftext|>\nTom had a red ball. He liked it.\n'
                b'<|endoftext|>\n\n<|endoftext|>\nThe end of the last story.\n')


def test_parse_tinystories(tmp_path):
  path = tmp_path / 'stories.txt'
  path.write_bytes(TINY_STORIES)
  assert data.parse_tinystories(path) == [b'Once upon a time there was a cat.', b'Tom had a red ball. He liked it.',
                                          b'The end of the last story.']


def test_tinystories_loader_uses_cached_download(cache, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError('the cached file must be used, not the network')
  monkeypatch.setattr(urllib.request, 'urlopen', no_network)
  stories = [f'Story {i}: a dog named {i} ran to the park and played all day.'.encode() for i in range(120)]
  target = cache / 'downloads' / data.TINYSTORIES_FILES['tinystories-valid']
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(b'\n<|endoftext|>\n'.join(stories))
  corpus = data.load_corpus('tinystories-valid', use_cache=False)
  assert (len(corpus.train_docs), len(corpus.eval_docs)) == (114, 6)
  split = [bytes(np.asarray(s)).split(b'\0')[:-1] for s in (corpus.train_N, corpus.eval_N)]
  assert sorted(split[0] + split[1]) == sorted(stories) and not set(split[0]) & set(split[1])


def test_download_failure_is_a_one_line_error(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise OSError('network is unreachable')
  monkeypatch.setattr(urllib.request, 'urlopen', offline)
  with pytest.raises(ValueError, match='cannot download') as e:
    data.download('https://example.invalid/x.txt', tmp_path / 'x.txt')
  assert '\n' not in str(e.value) and not os.listdir(tmp_path)  # no partial file left


def stream(n: int) -> np.ndarray:
  return np.arange(n, dtype=np.uint32)  # token value = position, so a window shows where it came from


def test_windows_are_contiguous_and_an_epoch_visits_every_tile():
  T, B, N = 16, 4, 16 * 40 + 5
  ds = data.train_dataset(stream(N), T, B, seed=0)
  n_tiles = (N - 1) // T
  rows = np.concatenate([ds[i] for i in range(n_tiles // B)])
  assert rows.shape == (n_tiles, T + 1) and rows.dtype == np.int32
  for row in rows:
    np.testing.assert_array_equal(row, np.arange(row[0], row[0] + T + 1))
  assert sorted(rows[:, 0] // T) == list(range(n_tiles))
  assert len(set(rows[:, 0] % T)) > 1  # random offsets inside tiles


def test_pipeline_is_seeded():
  a = data.train_dataset(stream(5000), 16, 4, seed=1)
  b = data.train_dataset(stream(5000), 16, 4, seed=1)
  c = data.train_dataset(stream(5000), 16, 4, seed=2)
  np.testing.assert_array_equal(np.stack([a[i] for i in range(5)]), np.stack([b[i] for i in range(5)]))
  assert not np.array_equal(np.stack([a[i] for i in range(5)]), np.stack([c[i] for i in range(5)]))


def test_iterator_state_resumes_exactly():
  ds = data.train_dataset(stream(5000), 16, 4, seed=0)
  it = data.train_iterator(ds)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  resumed = data.train_iterator(ds)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed), want)


def test_process_shards_partition_the_global_batch():
  tokens, T, B = stream(5000), 16, 8
  whole = data.train_dataset(tokens, T, B, seed=3)
  shards = [data.train_dataset(tokens, T, B, seed=3, process_index=p, process_count=2) for p in range(2)]
  for step in range(4):
    local = [s[step] for s in shards]
    assert local[0].shape == (B // 2, T + 1)
    interleaved = np.stack([local[i % 2][i // 2] for i in range(B)])
    np.testing.assert_array_equal(interleaved, whole[step])
  with pytest.raises(ValueError, match='divisible'):
    data.train_dataset(tokens, T, 3, seed=0, process_index=0, process_count=2)


def test_eval_batches_fixed_and_checked():
  tokens = stream(1000)
  a = data.eval_batches(tokens, 16, 4, 3)
  assert a.shape == (3, 4, 17) and a[0, 0, 0] == 0 and a[-1, -1, -1] == 999
  np.testing.assert_array_equal(a, data.eval_batches(tokens, 16, 4, 3))
  with pytest.raises(ValueError, match='seq_len=2000 is larger'):
    data.eval_batches(tokens, 2000, 4, 3)
  with pytest.raises(ValueError, match='larger than the train data'):
    data.train_dataset(tokens, 1000, 4, 0)
