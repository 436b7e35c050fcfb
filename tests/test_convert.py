"""Hugging Face conversion of the dense families (slmjax/convert): logits equal transformers' (stored fixtures,
tests/scripts/make_hf_fixtures.py), export is bit for bit, counts agree, bad checkpoints fail in one line."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import hf_parity
from slmjax import convert
from slmjax.config import ModelConfig
from slmjax.convert import common, hf_io, runs
from slmjax.model import init_cache

DENSE = ('llama', 'llama3', 'llama-linear', 'llama-longrope', 'mistral', 'qwen2', 'qwen2-yarn', 'qwen3', 'gemma2')


@pytest.mark.parametrize('name', DENSE)
def test_logits_match_transformers(name, tmp_path_factory):
  diff = hf_parity.logits_diff(hf_parity.fixture(name))
  hf_parity.record(tmp_path_factory, {'family': name, 'max_abs_logit_diff': diff})
  assert diff <= hf_parity.TOLERANCE


@pytest.mark.parametrize('name', DENSE)
def test_export_is_bit_for_bit(name, tmp_path):
  names = hf_parity.export_matches(hf_parity.fixture(name), tmp_path / 'out')
  assert 'model.layers.1.mlp.down_proj.weight' in names


@pytest.mark.parametrize('name', DENSE)
def test_counts_equal_counting(name):
  assert hf_parity.counts_match(hf_parity.fixture(name)) > 0


@pytest.mark.parametrize('name', ['gemma2', 'llama-longrope', 'deepseek_v2'])
def test_sliding_window_and_scale_survive_cached_decoding(name):
  """Gemma 2's local layers, query_pre_attn_scalar and soft-caps, longrope's long factors (picked by the cache's
  length) and DeepSeek's YaRN logit scale on the absorbed MLA path, decoded one token at a time through the KV
  cache, give the logits of the full forward."""
  model = convert.load_hf(hf_parity.fixture(name))
  tokens_BT = jnp.asarray(np.load(hf_parity.fixture(name) / 'tokens.npy'))
  caches = init_cache(model.cfg, tokens_BT.shape[0], tokens_BT.shape[1])
  graph, state = nnx.split(model)

  @jax.jit  # eager op-by-op dispatch would take seconds
  def reference(state, tokens_BT, caches):
    model = nnx.merge(graph, state)
    return model(tokens_BT)[0], model.cached_forward(tokens_BT[:, :4], caches, 0)[1]
  full_BTV, caches = reference(state, tokens_BT, caches)
  step = jax.jit(lambda state, tokens_B1, caches, t: nnx.merge(graph, state).cached_forward(tokens_B1, caches, t))
  steps = []
  for t in range(4, tokens_BT.shape[1]):  # past the window of 8: the local layer must forget the oldest keys
    logits_B1V, caches = step(state, tokens_BT[:, t:t + 1], caches, jnp.int32(t))
    steps.append(logits_B1V)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full_BTV[:, 4:], atol=1e-4)


def test_stacked_rule_round_trips_per_expert_tensors():
  rule = common.stacked(['e.0.w', 'e.1.w'], 'ffn.w_up_EDF', (3,), (2,))
  tensors = {'e.0.w': np.arange(6, dtype=np.float32).reshape(2, 3), 'e.1.w': -np.ones((2, 3), np.float32)}
  value_EDF = rule.read(tensors)
  assert value_EDF.shape == (2, 3, 2) and np.array_equal(value_EDF[0], tensors['e.0.w'].T)
  back = rule.write(value_EDF)
  assert all(back[n].tobytes() == tensors[n].tobytes() for n in tensors)
  with pytest.raises(ValueError, match=r'tensor e\.1\.w has shape \(3, 2\)'):
    rule.read({**tensors, 'e.1.w': np.zeros((3, 2), np.float32)})


def test_flops_count_the_keys_a_sliding_window_sees():
  from slmjax import counting
  cfg = ModelConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128)
  full = counting.train_flops_per_token(cfg, 64)
  attention = full - 6 * counting.analytic_counts(cfg).active_matmul  # 3 * L * T * H * 2Z
  assert attention == 3 * 2 * 64 * 4 * 32
  assert counting.train_flops_per_token(cfg.replace(sliding_window=64), 64) == full  # a window >= T changes nothing
  # Window 16 on layer 0 only: that layer's mean keys per query fall from 32 to 16 - 16^2 / 128 = 14.
  local = counting.train_flops_per_token(cfg.replace(sliding_window=16, sliding_every=2), 64)
  assert full - local == 6 * (32 - 14) * 4 * 32


def test_sharded_checkpoint_reads_back(tmp_path):
  cfg, state = convert.from_hf(hf_parity.fixture('qwen2'))
  convert.to_hf(cfg, state, tmp_path / 'sharded', shard_bytes=100_000)
  assert (tmp_path / 'sharded' / hf_io.INDEX).exists()
  assert len(list((tmp_path / 'sharded').glob('model-*-of-*.safetensors'))) > 1
  _, original = hf_io.read_model_dir(hf_parity.fixture('qwen2'))
  _, sharded = hf_io.read_model_dir(tmp_path / 'sharded')
  assert sorted(sharded) == sorted(original)
  assert all(np.array_equal(sharded[n], original[n]) for n in original)


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
  config, tensors = hf_io.read_model_dir(hf_parity.fixture('llama'))
  hf_io.write_model_dir(tmp_path / 'bf16', config, {n: t.astype(ml_dtypes.bfloat16) for n, t in tensors.items()})
  cfg, state = convert.from_hf(tmp_path / 'bf16')
  assert cfg.param_dtype == 'bfloat16' and cfg.dtype == 'float32'
  convert.to_hf(cfg, state, tmp_path / 'back')
  _, back = hf_io.read_model_dir(tmp_path / 'back')
  assert back['model.norm.weight'].dtype == ml_dtypes.bfloat16
  assert back['model.norm.weight'].tobytes() == tensors['model.norm.weight'].astype(ml_dtypes.bfloat16).tobytes()


def copy_fixture(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(hf_parity.fixture(name), tmp_path / name))


def edit_tensors(path: pathlib.Path, edit) -> None:
  config, tensors = hf_io.read_model_dir(path)
  tensors = {n: np.array(t) for n, t in tensors.items()}
  edit(tensors)
  (path / 'model.safetensors').unlink()
  hf_io.write_model_dir(path, config, tensors)


def test_truncated_file_is_one_line(tmp_path):
  path = copy_fixture(tmp_path, 'llama')
  data = (path / 'model.safetensors').read_bytes()
  (path / 'model.safetensors').write_bytes(data[:len(data) - 100])
  with pytest.raises(ValueError, match='a truncated or corrupt file'):
    convert.from_hf(path)


def test_unknown_model_type_lists_the_known(tmp_path):
  path = copy_fixture(tmp_path, 'llama')
  config = json.loads((path / 'config.json').read_text())
  (path / 'config.json').write_text(json.dumps({**config, 'model_type': 'rwkv'}))
  with pytest.raises(ValueError, match=r"model_type 'rwkv' is not supported; known: .*gemma2.*llama.*qwen3"):
    convert.from_hf(path)


def test_missing_tensor_is_named(tmp_path):
  path = copy_fixture(tmp_path, 'llama')
  edit_tensors(path, lambda t: t.pop('model.layers.1.self_attn.k_proj.weight'))
  with pytest.raises(ValueError, match=r'no tensor model\.layers\.1\.self_attn\.k_proj\.weight \(expected shape '
                                       r'\(32, 64\)'):
    convert.from_hf(path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
  path = copy_fixture(tmp_path, 'llama')
  edit_tensors(path, lambda t: t.update({'model.layers.0.mlp.up_proj.weight': np.zeros((95, 64), np.float32)}))
  with pytest.raises(ValueError, match=r'model\.layers\.0\.mlp\.up_proj\.weight has shape \(95, 64\), but its '
                                       r'config\.json implies \(96, 64\)'):
    convert.from_hf(path)


def test_unread_tensor_is_an_error(tmp_path):
  path = copy_fixture(tmp_path, 'llama')
  edit_tensors(path, lambda t: t.update({'model.layers.0.mlp.up_proj.bias': np.zeros((96,), np.float32)}))
  with pytest.raises(ValueError, match=r'model\.layers\.0\.mlp\.up_proj\.bias .* not read by the conversion'):
    convert.from_hf(path)


def test_not_a_model_directory(tmp_path):
  with pytest.raises(ValueError, match='no config.json'):
    convert.from_hf(tmp_path)
  (tmp_path / 'config.json').write_text('{"model_type": "llama"}')
  with pytest.raises(ValueError, match=r'no \*\.safetensors'):
    convert.from_hf(tmp_path)


def test_unsupported_features_fail_in_one_line():
  base = json.loads((hf_parity.fixture('llama') / 'config.json').read_text())
  with pytest.raises(ValueError, match="rope type 'dynamic' is not implemented"):
    convert.config_from_hf({**base, 'rope_parameters': {'rope_type': 'dynamic', 'rope_theta': 1e4, 'factor': 4}})
  with pytest.raises(ValueError, match='short_mscale=1.2 != long_mscale=1.5 is not implemented'):
    phimoe = json.loads((hf_parity.fixture('phimoe') / 'config.json').read_text())
    phimoe['rope_parameters'].update(long_mscale=1.5)
    convert.config_from_hf(phimoe)
  with pytest.raises(ValueError, match='rope_long_factor of rope_dim / 2 = 8 positive numbers, got 3'):
    phimoe['rope_parameters'].update(long_mscale=1.2, long_factor=[1.0, 2.0, 3.0])
    convert.config_from_hf(phimoe)
  with pytest.raises(ValueError, match='mlp_bias'):
    convert.config_from_hf({**base, 'mlp_bias': True})
  moe = ModelConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, n_experts=4)
  with pytest.raises(ValueError, match='llama checkpoints cannot express n_experts=4'):
    convert.to_hf(moe, None, '/nonexistent', model_type='llama')


def test_hub_style_rope_fields_read_like_rope_parameters():
  base = json.loads((hf_parity.fixture('llama3') / 'config.json').read_text())
  params = base.pop('rope_parameters')
  hub = {**base, 'rope_theta': params.pop('rope_theta'), 'rope_scaling': params}
  assert convert.config_from_hf(hub) == convert.config_from_hf({**base, 'rope_parameters': {
      **params, 'rope_theta': hub['rope_theta']}})
  assert convert.config_from_hf(hub).rope_scaling == 'llama3'


def test_sliding_layers_of_older_hub_configs():
  gemma = json.loads((hf_parity.fixture('gemma2') / 'config.json').read_text())
  del gemma['layer_types']
  assert (convert.config_from_hf(gemma).sliding_window, convert.config_from_hf(gemma).sliding_every) == (8, 2)
  qwen = json.loads((hf_parity.fixture('qwen2') / 'config.json').read_text())
  qwen.pop('layer_types', None)
  assert convert.config_from_hf({**qwen, 'use_sliding_window': False, 'sliding_window': 4096}).sliding_window == 0
  assert convert.config_from_hf({**qwen, 'use_sliding_window': True, 'sliding_window': 16,
                                 'max_window_layers': 0}).window(1) == 16
  with pytest.raises(ValueError, match='is not a pattern slmjax expresses'):
    convert.config_from_hf({**qwen, 'use_sliding_window': True, 'sliding_window': 16, 'max_window_layers': 1})


@pytest.mark.parametrize('field, value, message', [
    ('sliding_window', -1, 'sliding_window must be an integer >= 0'),
    ('sliding_every', 0, 'sliding_every must be a positive integer'),
    ('query_pre_attn_scalar', -1.0, 'query_pre_attn_scalar must be >= 0'),
    ('rope_low_freq_factor', 5.0, 'rope_scaling=llama3 needs'),
])
def test_new_config_fields_are_validated(field, value, message):
  changes = {'rope_scaling': 'llama3'} if field.startswith('rope') else {}
  with pytest.raises(ValueError, match=message):
    ModelConfig(**changes, **{field: value})


@pytest.mark.parametrize('name', DENSE)
def test_live_transformers_parity(name, tmp_path):
  """Built afresh with transformers (skipped where torch is not installed: the fixtures are the CI path); the
  exported directory loads back into transformers with the same logits."""
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  maker = hf_parity.live_maker()
  path = maker.save(name, tmp_path / name)
  assert hf_parity.logits_diff(path) <= hf_parity.TOLERANCE
  cfg, state = convert.from_hf(path)
  convert.to_hf(cfg, state, tmp_path / 'export', model_type=json.loads((path / 'config.json').read_text())[
      'model_type'])
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'export', attn_implementation='eager')
  tokens_BT = np.load(path / 'tokens.npy')
  np.testing.assert_array_equal(maker.logits_of(reloaded, tokens_BT), np.load(path / 'logits.npy'))


# Run directories, the command lines and a model's own tokenizer (tokenizer.json built here: no download).
ROOT = pathlib.Path(__file__).parent.parent
ENV = {'SLMJAX_HUGEPAGES': '0', 'PATH': '/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu'}
WORDS = 'the model reads every token of a small corpus and learns which word comes next in the text'.split()


def write_texts(path: pathlib.Path, n_docs: int = 120) -> list[str]:  # >= data.MIN_DOCUMENTS: none cut
  rng = np.random.default_rng(0)
  path.mkdir()
  texts = [' '.join(rng.choice(WORDS, 30)) + '.\n' for _ in range(n_docs)]
  for i, text in enumerate(texts):
    (path / f'doc{i:02d}.txt').write_text(text)
  return texts


def write_tokenizer(path: pathlib.Path, texts: list[str], vocab: int = 300) -> pathlib.Path:
  tokenizers = pytest.importorskip('tokenizers')
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=['<|endoftext|>'],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  tok.save(str(path))
  return path


def small_hf_model(tmp_path: pathlib.Path) -> pathlib.Path:
  """A random slmjax Llama exported as a Hugging Face directory with a tokenizer.json (vocab 300)."""
  texts = write_texts(tmp_path / 'texts')
  cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64,
                    tie_embeddings=True)
  from slmjax.model import create_model
  convert.to_hf(cfg, nnx.state(create_model(cfg)), tmp_path / 'hf')
  write_tokenizer(tmp_path / 'hf' / 'tokenizer.json', texts)
  return tmp_path / 'hf'


def test_tokenizer_corpus_counts_bytes(tmp_path):
  from slmjax import data
  texts = write_texts(tmp_path / 'texts')
  path = write_tokenizer(tmp_path / 'tokenizer.json', texts)
  corpus = data.load_corpus(str(tmp_path / 'texts'), 0.1, tokenizer=str(path))
  tok = data.HFTokenizer(path)
  assert corpus.tokenizer == 'hf:tokenizer.json' and corpus.max_token < tok.vocab_size
  assert tok.eot is not None and np.sum(corpus.eval_N == tok.eot) == len(corpus.eval_docs)
  by_hash = {__import__('hashlib').sha1(np.asarray(tok.encode(t).tolist() + [tok.eot], np.int32).tobytes())
             .hexdigest(): t for t in texts}
  assert corpus.eval_bytes == sum(len(by_hash[h].encode()) for h in corpus.eval_docs)


def test_missing_tokenizers_package_is_one_line(tmp_path, monkeypatch):
  import builtins
  from slmjax import data
  real_import = builtins.__import__
  monkeypatch.setattr(builtins, '__import__', lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                      if name == 'tokenizers' else real_import(name, *a, **k))
  with pytest.raises(ValueError, match='pip install tokenizers'):
    data.HFTokenizer(tmp_path / 'tokenizer.json')


def run_script(script: str, *args: str, cwd: pathlib.Path):
  import subprocess
  import sys
  result = subprocess.run([sys.executable, str(ROOT / 'experiments' / script), *args], cwd=cwd, capture_output=True,
                          text=True, env={**ENV, 'PYTHONPATH': str(ROOT)})
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


@pytest.mark.slow
def test_convert_cli_round_trip(tmp_path):
  """convert.py --from_hf writes a run that load_model reads; --to_hf gives the checkpoint back bit for bit."""
  run_script('convert.py', f'--from_hf={hf_parity.fixture("qwen3")}', '--out=run', cwd=tmp_path)
  from slmjax import trained
  model, step = trained.load_model(tmp_path / 'run')
  assert step == 0 and model.cfg.qk_norm == 'head'
  out = run_script('convert.py', '--out=run', '--to_hf=back', cwd=tmp_path)
  assert '(qwen3)' in out
  _, original = hf_io.read_model_dir(hf_parity.fixture('qwen3'))
  _, back = hf_io.read_model_dir(tmp_path / 'back')
  assert sorted(back) == sorted(original)
  assert all(back[n].tobytes() == original[n].tobytes() for n in original)


@pytest.mark.slow
def test_train_init_from_evaluates_and_fine_tunes_with_the_models_tokenizer(tmp_path):
  hf = small_hf_model(tmp_path)
  common = [f'--init_from={hf}', f'--data={tmp_path / "texts"}', '--seq_len=32', '--batch_size=2',
            '--eval_batches=2', '--eval_fraction=0.1', '--nomfu']
  out = run_script('train.py', *common, '--eval_only', '--json', cwd=tmp_path)
  before = json.loads(out.strip().splitlines()[-1])
  assert before['eval_loss'] > 0 and 0 < before['eval_bpb'] < 20
  out = run_script('train.py', *common, '--steps=3', '--lr=1e-2', '--warmup=0', '--out=ft', '--json', cwd=tmp_path)
  after = json.loads(out.strip().splitlines()[-1])
  saved = json.loads((tmp_path / 'ft' / 'config.json').read_text())
  assert saved['train']['tokenizer'].endswith('tokenizer.json') and saved['data']['tokenizer'] == 'hf:tokenizer.json'
  assert 'eval_bpb' in after and after['step'] == 3
  rows = [json.loads(line) for line in (tmp_path / 'ft' / 'metrics.jsonl').read_text().splitlines()]
  assert rows[0]['step'] == 0 and rows[0]['eval_loss'] == pytest.approx(before['eval_loss'], rel=1e-5)
  # The same model as a converted run directory carries its tokenizer along.
  run_script('convert.py', f'--from_hf={hf}', '--out=run', cwd=tmp_path)
  assert (tmp_path / 'run' / 'tokenizer.json').exists()
  common[0] = '--init_from=run'
  again = json.loads(run_script('train.py', *common, '--eval_only', '--json', cwd=tmp_path).strip().splitlines()[-1])
  assert again == before


def test_init_from_rejects_architecture_flags(tmp_path):
  import subprocess
  import sys
  result = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'train.py'),
                           f'--init_from={hf_parity.fixture("llama")}', '--d_model=32', '--eval_only'],
                          cwd=tmp_path, capture_output=True, text=True, env={**ENV, 'PYTHONPATH': str(ROOT)})
  assert result.returncode == 2
  assert 'error: --d_model cannot change the model --init_from=' in result.stderr


def test_read_source_names_what_the_path_is_instead_of_blaming_a_missing_config(tmp_path):
  """A missing path, a file, and a WSD run's parent directory (its branches are the runs) each say so."""
  (tmp_path / 'file').write_text('')
  (tmp_path / 'wsd' / 'trunk').mkdir(parents=True)
  (tmp_path / 'wsd' / 'branch-80').mkdir()
  (tmp_path / 'wsd' / 'branch-160').mkdir()
  for path, message in (('missing', 'does not exist'), ('file', 'is a file'),
                        ('wsd', r'is a WSD run; give one of its branches \(branch-80, branch-160\) or trunk/')):
    with pytest.raises(ValueError, match=message):
      runs.read_source(tmp_path / path)
