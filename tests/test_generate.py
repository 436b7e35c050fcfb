"""KV-cache generation: cached decoding reproduces the full forward, seeds fix samples, bad requests fail in one line."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slmjax import counting, dispatch, generate
from slmjax.config import ModelConfig, SamplingConfig
from slmjax.dispatch.experts import ExpertWeights
from slmjax.model import create_model, init_cache

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=24)
CASES = {
    'mha-tied': BASE,
    'gqa-untied': BASE.replace(n_kv_heads=2, tie_embeddings=False, qk_norm='head', qkv_bias=True, o_bias=True),
    'moe-dropless': BASE.replace(n_kv_heads=1, n_experts=8, top_k=2, d_expert=16, n_shared_experts=1,
                                 first_dense=1, capacity_factor=1.0),  # generation ignores the capacity: dropless
    'mla': BASE.replace(attention='mla', q_lora_rank=12, kv_lora_rank=20, qk_rope_dim=4, tie_embeddings=False,
                        attn_softcap=20.0, logit_softcap=30.0, post_norms=True),
    'mla-moe': BASE.replace(attention='mla', n_experts=4, top_k=1, d_expert=16, router='sigmoid',
                            router_renormalize=False),
}
PROMPT = 5


def _randomized(model):
  """Norm gains and biases away from their 1 / 0 init, so the test sees them."""
  rng = np.random.default_rng(1)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if var.ndim == 1 or 'b_' in str(path[-1]):
      var[...] = jnp.asarray(var[...] + 0.3 * rng.normal(size=var.shape), var.dtype)
  return model


@functools.lru_cache(maxsize=None)
def _decode_fn(cfg):
  graph = nnx.graphdef(create_model(generate.decode_config(cfg)))

  @jax.jit
  def step(state, caches, token_B1, start):
    return nnx.merge(graph, state).cached_forward(token_B1, caches, start)
  return step


@pytest.mark.parametrize('name', list(CASES))
def test_cached_decode_logits_equal_the_full_forward(name):
  cfg = CASES[name]
  model = _randomized(create_model(cfg, seed=0))
  tokens_BT = jax.random.randint(jax.random.key(2), (2, cfg.max_seq_len), 0, cfg.vocab_size)
  graph = nnx.graphdef(create_model(generate.prefill_config(cfg)))

  @jax.jit
  def reference(state, tokens_BT):
    full = nnx.merge(graph, state)
    return full(tokens_BT)[0], full.cached_forward(tokens_BT[:, :PROMPT], init_cache(cfg, 2, cfg.max_seq_len), 0)
  full_BTV, (prefill_BTV, caches) = reference(nnx.state(model), tokens_BT)
  np.testing.assert_allclose(prefill_BTV, full_BTV[:, :PROMPT], atol=1e-5, rtol=1e-5)
  step, state = _decode_fn(cfg), nnx.state(model)
  for t in range(PROMPT, cfg.max_seq_len):
    logits_B1V, caches = step(state, caches, tokens_BT[:, t:t + 1], jnp.int32(t))
    np.testing.assert_allclose(logits_B1V[:, 0], full_BTV[:, t], atol=1e-5, rtol=1e-5, err_msg=f'position {t}')


def test_cache_bytes_match_the_count():
  for cfg in CASES.values():
    caches = init_cache(cfg, 3, 7)
    assert sum(x.nbytes for x in jax.tree.leaves(caches)) == 3 * 7 * counting.kv_cache_bytes_per_token(cfg)


def test_select_dispatch_equals_dropless():
  """Fewer assignments than experts: per-assignment weight gathers; as many or more: the dropless gather fallback
  (no sort: not ragged). Both equal the compute-all oracle (and so the dropless dispatch), outputs and
  gradients."""
  rng = np.random.default_rng(0)
  E, D, F = 16, 8, 12
  w = ExpertWeights(*(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))))
  for X, A in ((3, 2), (1, 4), (8, 2), (12, 2)):
    x_GSD = jnp.asarray(rng.normal(size=(1, X, D)), jnp.float32)
    experts_GSA = jnp.asarray(np.argsort(rng.uniform(size=(1, X, E)), axis=-1)[..., :A], jnp.int32)
    gates_GSA = jnp.asarray(rng.uniform(0.1, 1, size=(1, X, A)), jnp.float32)

    def loss(name, x, g, w):
      return jnp.sum(jnp.sin(dispatch.DISPATCH[name](x, g, experts_GSA, w, 1, 'swiglu')[0]))
    run = jax.jit(lambda x, g, w, e: {n: dispatch.DISPATCH[n](x, g, e, w, 1, 'swiglu')[0]  # capacity 1: ignored
                                      for n in ('select', 'ragged', 'dense')})
    y = run(x_GSD, gates_GSA, w, experts_GSA)
    for name in ('select', 'ragged'):
      np.testing.assert_allclose(y[name], y['dense'], atol=1e-5, rtol=1e-5)
    grads = [jax.jit(jax.grad(functools.partial(loss, n), argnums=(0, 1, 2)))(x_GSD, gates_GSA, w)
             for n in ('select', 'dense')]
    for a, b in zip(*map(jax.tree.leaves, grads)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    hlo = jax.jit(lambda x: dispatch.DISPATCH['select'](x, gates_GSA, experts_GSA, w, 1, 'swiglu')[0]
                  ).lower(x_GSD).as_text()
    products = [line for line in hlo.splitlines() if 'dot_general' in line]
    assert '"stablehlo.sort"' not in hlo
    assert any('tensor<16x' in line for line in products) == (X * A >= E)  # E-wide products: gather's buffers


def test_select_decode_reads_only_the_chosen_experts():
  """At batch 1 the compiled MoE decode step slices k expert matrices: no operand of the dispatch is E wide."""
  cfg = CASES['moe-dropless']
  x_GSD = jnp.ones((1, 1, cfg.d_model))
  w = ExpertWeights(*(jnp.ones(s) for s in ((8, 32, 16), (8, 32, 16), (8, 16, 32))))
  hlo = jax.jit(lambda x, w: dispatch.DISPATCH['select'](
      x, jnp.ones((1, 1, 2)), jnp.array([[[1, 5]]], jnp.int32), w, 1, 'swiglu')[0]).lower(x_GSD, w).as_text()
  products = [line for line in hlo.splitlines() if 'dot_general' in line]
  assert 'stablehlo.dynamic_slice' in hlo and 'stablehlo.sort' not in hlo and len(products) == 3
  assert not any('tensor<8x' in line for line in products)  # every product on one sliced expert


def test_select_in_bf16_converts_only_the_chosen_experts():
  """In the compiled bf16 program no op makes an f32 copy of all E experts' weights: XLA:CPU runs a bf16 slice in
  f32 and hoists the conversion of the whole array out of the scan, unless the slice is on the bits."""
  w = ExpertWeights(*(jnp.ones(s, jnp.bfloat16) for s in ((8, 32, 16), (8, 32, 16), (8, 16, 32))))
  step = jax.jit(lambda x, w: dispatch.DISPATCH['select'](
      x, jnp.ones((1, 1, 2)), jnp.array([[[1, 5]]], jnp.int32), w, 1, 'swiglu')[0])
  hlo = step.lower(jnp.ones((1, 1, 32), jnp.bfloat16), w).compile().as_text()
  assert not re.search(r'= f32\[8,\d+,\d+\]', hlo)


def test_generation_is_seeded_and_greedy_is_the_argmax():
  cfg = CASES['moe-dropless']
  model = create_model(cfg, seed=0)
  prompt_BT = np.arange(8, dtype=np.int32).reshape(2, 4)
  sampled = generate.Generator(model, 2, 16, SamplingConfig(max_new_tokens=10, temperature=1.0, top_k_tokens=20,
                                                            top_p=0.9))
  a, b, c = sampled.generate(prompt_BT), sampled.generate(prompt_BT), sampled.generate(prompt_BT, seed=1)
  assert a.shape == (2, 10) and (a == b).all() and not (a == c).all()
  greedy = generate.Generator(model, 2, 16, SamplingConfig(max_new_tokens=6, temperature=0.0)).generate(prompt_BT)
  graph = nnx.graphdef(create_model(generate.prefill_config(cfg)))
  forward = jax.jit(lambda state, tokens_BT: nnx.merge(graph, state)(tokens_BT)[0])
  sequence_BT = np.zeros((2, 10), np.int32)  # causal: the zeros after position t do not change its logits
  sequence_BT[:, :4] = prompt_BT
  for t in range(4, 10):  # the greedy continuation, one full forward per token
    sequence_BT[:, t] = np.argmax(forward(nnx.state(model), sequence_BT)[:, t - 1], -1)
  np.testing.assert_array_equal(greedy, sequence_BT[:, 4:])


def test_top_k_and_top_p_restrict_the_draws():
  logits_BV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  top2 = generate.sample_tokens(logits_BV, keys, SamplingConfig(temperature=1.0, top_k_tokens=2))
  assert set(np.unique(top2)) == {0, 1}
  nucleus = generate.sample_tokens(logits_BV, keys, SamplingConfig(temperature=1.0, top_p=0.7))
  assert set(np.unique(nucleus)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
  everything = generate.sample_tokens(logits_BV, keys, SamplingConfig(temperature=1.0))
  assert set(np.unique(everything)) == {0, 1, 2, 3}
  assert 0.45 < np.mean(np.asarray(everything) == 0) < 0.55


@pytest.mark.parametrize('call, message', [
    (lambda m: generate.Generator(m, 0, 16), 'batch must be a positive number'),
    (lambda m: generate.Generator(m, 1, 24).generate(np.zeros((1, 30), np.int32), 4), "the model's max_seq_len"),
    (lambda m: generate.check_request(m.cfg, 1, 20, 5), "exceeds the model's max_seq_len=24"),
    (lambda m: generate.Generator(m, 1, 16).generate(np.zeros((1, 10), np.int32), 10),
     'exceeds the cache of 16 positions'),
    (lambda m: generate.Generator(m, 1, 64), 'max_seq_len=24'),
    (lambda m: generate.Generator(m, 1, 16).generate(np.zeros((1, 0), np.int32), 4), 'the prompt is empty'),
    (lambda m: SamplingConfig(top_p=0.0), 'top_p must be in'),
])
def test_bad_requests_fail_in_one_line(call, message):
  with pytest.raises(ValueError, match=message) as e:
    call(create_model(BASE))
  assert '\n' not in str(e.value)


def test_load_model_round_trip(tmp_path):
  """A run trained 2 steps by the library loads with its trained parameters: logits equal those of the state
  restored the way training restores it, and differ from the untrained model's."""
  import pathlib
  import sysconfig

  from slmjax import checkpoint, steps, trained
  from slmjax.config import TrainConfig
  from slmjax.train import train
  cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16, n_experts=4, top_k=2, d_expert=8)
  train_cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup=1, lr=1e-2, eval_every=0, eval_batches=1,
                          log_every=1, checkpoint_every=0,
                          data=str(pathlib.Path(sysconfig.get_paths()['stdlib']) / 'json' / '__init__.py'))
  train(cfg, train_cfg, tmp_path / 'run', log=None)
  model, step = trained.load_model(tmp_path / 'run')
  graph, state, _, opt_state = steps.init_state(cfg, train_cfg)
  with checkpoint.Checkpointer(tmp_path / 'run' / 'checkpoints') as ckpt:
    restored, _, _, _ = ckpt.restore(2, state, opt_state)
  tokens_BT = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % cfg.vocab_size
  logits = nnx.jit(lambda m: m(tokens_BT)[0])  # compiled once for the three models, not run op by op
  loaded_BTV = logits(model)
  assert step == 2 and model.cfg == cfg
  np.testing.assert_array_equal(loaded_BTV, logits(nnx.merge(graph, restored)))
  assert not np.allclose(loaded_BTV, logits(nnx.merge(graph, state)), atol=1e-4)  # trained, not fresh
  with pytest.raises(ValueError, match='holds no run'):
    trained.load_model(tmp_path / 'nothing')


@pytest.mark.slow
def test_sample_init_from_an_hf_directory_uses_its_tokenizer(tmp_path):
  """sample.py --init_from on the llama fixture (vocabulary 128: byte tokens would not fit) with a tokenizer.json
  built here: the printed greedy text is the prompt plus the decoded tokens of the same greedy generation run
  in this process."""
  import os
  import pathlib
  import shutil
  import subprocess
  import sys

  tokenizers = pytest.importorskip('tokenizers')
  from slmjax import convert, data
  hf = tmp_path / 'llama'
  shutil.copytree(pathlib.Path(__file__).parent / 'fixtures' / 'hf' / 'llama', hf)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(['the model reads every token and learns which word comes next'] * 20,
                          tokenizers.trainers.BpeTrainer(vocab_size=60, special_tokens=['</s>']))
  tok.save(str(hf / 'tokenizer.json'))
  prompt = 'the model reads'
  root = pathlib.Path(__file__).parent.parent
  path = os.pathsep.join(filter(None, (str(root), os.environ.get('PYTHONPATH'))))  # keep the caller's packages
  done = subprocess.run([sys.executable, str(root / 'experiments' / 'sample.py'),
                         f'--init_from={hf}', f'--prompt={prompt}', '--max_new_tokens=6', '--temperature=0'],
                        capture_output=True, text=True, timeout=300, env={**os.environ, 'PYTHONPATH': path})
  assert done.returncode == 0, done.stderr[-2000:]
  head, _, text = done.stdout.partition('---\n')
  assert f'tokenizer {hf / "tokenizer.json"}' in head
  tokenizer = data.HFTokenizer(hf / 'tokenizer.json')
  prompt_T = tokenizer.encode(prompt)
  tokens_BN = generate.Generator(convert.load_hf(hf), 1, len(prompt_T) + 6, SamplingConfig(temperature=0.0)
                                 ).generate(prompt_T[None], 6)
  assert len(prompt_T) < len(prompt) and text.rstrip('\n') == prompt + tokenizer.decode(tokens_BN[0])
