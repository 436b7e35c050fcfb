"""Published architectures: exact counts (module tree == closed form == published), and every scaled-down twin
trains on CPU; plus the model features they brought (MLA, QK-norm, sigmoid router with selection bias, ...)."""

import functools
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from slmjax import counting, moe, presets
from slmjax.config import ModelConfig, TrainConfig
from slmjax.model import abstract_model, balanced_router_biases, create_model
from slmjax.steps import init_state, make_train_step

SCRIPT = pathlib.Path(__file__).parent.parent / 'experiments' / 'count.py'
UNITS = {'M': 1e6, 'B': 1e9, 'T': 1e12}
# Exact parameter counts published independently of the model cards (checkpoint tensor sums, report tables).
EXACT_TOTAL = {'llama-3-8b': 8_030_261_248, 'llama-3.2-3b': 3_212_749_824, 'mixtral-8x7b': 46_702_792_704,
               'deepseek-v3': 671_026_419_200, 'kimi-k2': 1_026_408_232_448}
EXACT_NON_EMBEDDING = {'gemma-2-2b': 2_024_517_888}  # Gemma 2 report, table 2
QWEN_NON_EMBEDDING = {'qwen2.5-0.5b': '0.36B', 'qwen2.5-1.5b': '1.31B'}  # Qwen2.5 model cards


def agrees(ours: int, published) -> bool:
  """An int must be equal; a figure like '46.7B' must be ours rounded or truncated to its digits, or within 1%."""
  if isinstance(published, int):
    return ours == published
  digits, scale = published[:-1], UNITS[published[-1]]
  step = scale / 10 ** (len(digits.split('.')[1]) if '.' in digits else 0)
  value = float(digits) * scale
  return (any(math.isclose(x, value, rel_tol=1e-9) for x in (round(ours / step) * step, ours // step * step))
          or abs(ours - value) <= 0.01 * value)


@pytest.mark.parametrize('name', presets.names())
def test_module_tree_counts_equal_the_closed_form(name):
  cfg = presets.get(name)
  assert counting.module_counts(cfg) == counting.analytic_counts(cfg)


@pytest.mark.parametrize('name', presets.names())
def test_counts_match_the_published_figures(name):
  cfg = presets.get(name)
  counts = counting.analytic_counts(cfg)
  total, active = presets.PUBLISHED[name]
  assert agrees(counts.total, total), (counts.total, total)
  # Published "active" figures differ on whether the input embedding (a lookup, no FLOPs) is included.
  assert any(agrees(n, active) for n in (counts.active, counts.active - cfg.vocab_size * cfg.d_model)), (
      counts.active, active)
  if name in EXACT_TOTAL:
    assert counts.total == EXACT_TOTAL[name]
  if name in EXACT_NON_EMBEDDING:
    assert counts.non_embedding == EXACT_NON_EMBEDDING[name]
  if name in QWEN_NON_EMBEDDING:
    assert agrees(counts.non_embedding, QWEN_NON_EMBEDDING[name])


def test_the_agreement_rule_is_not_vacuous():
  assert agrees(46_702_792_704, '46.7B') and agrees(37_552_297_472, '37B')  # rounded; truncated
  assert not agrees(56_000_000_000, '46.7B') and not agrees(12_600_000_000, '12.9B')
  assert not agrees(46_702_792_705, 46_702_792_704)


def test_mixtral_is_not_eight_times_mistral():
  """47B, not 8 x 7B = 56B: only the FFNs are replicated; attention, norms and embeddings are shared."""
  mistral, mixtral = (counting.analytic_counts(presets.get(n)) for n in ('mistral-7b', 'mixtral-8x7b'))
  cfg = presets.get('mixtral-8x7b')
  ffn = cfg.n_layers * 3 * cfg.d_model * cfg.ffn_size  # Mistral 7B's FFNs: 5.6B of its 7.24B
  assert mixtral.total == mistral.total + 7 * ffn + cfg.n_layers * cfg.d_model * 8  # + 7 more FFNs + routers
  assert mixtral.active == mistral.total + ffn + cfg.n_layers * cfg.d_model * 8  # + 1 more FFN + routers


@pytest.mark.parametrize('name', presets.names())
def test_scale_down_keeps_every_structural_feature(name):
  cfg = presets.get(name)
  small = presets.scale_down(cfg)
  assert presets.structural_features(small) == presets.structural_features(cfg)
  assert counting.analytic_counts(small).total < 2_000_000


def _small_architectures() -> dict[str, ModelConfig]:
  """Scaled-down twins at d_model 32 with the fewest layers that show every layer kind (a dense prefix layer,
  then one MoE layer), one per distinct program: presets whose twins differ only in constants (rope_theta,
  norm_eps, routed_scale) share one, named 'a/b/...' after all of them."""
  groups: dict[str, tuple[list[str], ModelConfig]] = {}
  for name in presets.names():
    cfg = presets.scale_down(presets.get(name), d_model=32, max_seq_len=16)
    cfg = cfg.replace(n_layers=cfg.first_dense + 1)
    key = cfg.replace(rope_theta=1.0, norm_eps=1e-6, routed_scale=1.0).to_json()
    groups.setdefault(key, ([], cfg))[0].append(name)
  return {'/'.join(names): cfg for names, cfg in groups.values()}


SMALL = _small_architectures()
# Tiny programs: XLA's cheapest optimisation level compiles about twice as fast, and compiling is the whole cost.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def test_every_preset_has_a_scaled_down_twin_that_trains():
  assert sorted(n for names in SMALL for n in names.split('/')) == sorted(presets.names())


@pytest.mark.parametrize('names', SMALL)
def test_scaled_down_preset_trains_on_cpu(names):
  """Init and three SGD steps, jitted as one program: finite loss and gradients, and the loss goes down."""
  cfg = SMALL[names]
  tx = optax.sgd(0.3)
  tokens_BT = jax.random.randint(jax.random.key(0), (2, 17), 0, cfg.vocab_size)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def init_and_train():
    graphdef, params, rest = nnx.split(create_model(cfg, seed=0), nnx.Param, ...)

    def loss_fn(params):
      logits_BTV, extras = nnx.merge(graphdef, params, rest)(tokens_BT[:, :-1])
      nll_BT = -jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), tokens_BT[:, 1:, None], -1)[..., 0]
      return jnp.mean(nll_BT) + extras['aux_loss']

    def step(carry, _):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params)
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), (loss, finite)

    _, (losses, finite) = jax.lax.scan(step, (params, tx.init(params)), length=3)
    return losses, finite

  losses, finite = init_and_train()
  assert bool(jnp.all(finite)) and np.isfinite(losses).all() and losses[-1] < losses[0], losses


def _fast_model(cfg: ModelConfig) -> nnx.Module:
  """create_model(cfg), its initialisation jitted (eager init compiles one random op per parameter shape)."""
  graphdef, _ = nnx.split(abstract_model(cfg))
  state = jax.jit(lambda: nnx.state(create_model(cfg)), compiler_options=FAST_COMPILE)()
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize('name', ['deepseek-v3', 'gemma-2-2b'])
def test_attention_variants_are_causal(name):
  """MLA (shared rotary key, low-rank paths) and soft-capped attention see no future token."""
  cfg = presets.scale_down(presets.get(name), d_model=32, max_seq_len=16).replace(n_experts=0, n_layers=1)
  graphdef, state = nnx.split(_fast_model(cfg))
  t = 5

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def grad_of_logit_at_t(x_BTD):
    return jax.grad(lambda x: jnp.sum(nnx.merge(graphdef, state).forward_embeddings(x)[0][:, t]))(x_BTD)

  grad_BTD = grad_of_logit_at_t(jax.random.normal(jax.random.key(0), (1, 12, cfg.d_model)))
  np.testing.assert_array_equal(grad_BTD[:, t + 1:], 0.0)
  assert np.abs(grad_BTD[:, :t + 1]).sum() > 0


def test_sigmoid_router_bias_steers_selection_only():
  logits_XE = jnp.array([[0.0, 1.0, 2.0, -1.0]])
  bias_E = jnp.array([10.0, 0.0, 0.0, 0.0])
  r = moe.route(logits_XE, 2, 'sigmoid', renormalize=False, bias_E=bias_E)
  assert sorted(r.experts_XA[0].tolist()) == [0, 2]  # expert 0 only by its bias
  s = jax.nn.sigmoid(logits_XE[0])
  np.testing.assert_allclose(sorted(r.gates_XA[0].tolist()), sorted([s[0], s[2]]), rtol=1e-6)
  r = moe.route(logits_XE, 2, 'sigmoid', renormalize=True, bias_E=bias_E)
  np.testing.assert_allclose(float(r.gates_XA.sum()), 1.0, rtol=1e-6)
  grad_E = jax.grad(lambda b: moe.route(logits_XE, 2, 'sigmoid', True, b).gates_XA.sum())(bias_E)
  np.testing.assert_array_equal(grad_E, 0.0)
  np.testing.assert_allclose(moe.balance_selection_bias(jnp.zeros(4), jnp.array([0.5, 0.25, 0.25, 0.0]), 0.1),
                             [-0.1, 0.0, 0.0, 0.1])


def test_selection_bias_is_stored_but_not_trained():
  cfg = presets.scale_down(presets.get('deepseek-v3'), d_model=32, max_seq_len=16)
  model = _fast_model(cfg)
  assert not any('b_select_E' in str(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  weights = counting.stored_weights(model)
  assert [w.path[-1] for w in weights if w.role == 'selection_bias'] == ['b_select_E'] * cfg.n_moe_layers
  graphdef, state = nnx.split(model)
  extras = jax.jit(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 16), jnp.int32))[1],
                   compiler_options=FAST_COMPILE)(state)
  biases = balanced_router_biases(model, extras)
  np.testing.assert_array_equal(model.blocks[1].ffn.b_select_E[...], 0.0)  # pure: the model is not changed
  bias_E = np.asarray(biases['blocks'][1]['ffn']['b_select_E'][...])
  assert np.all(np.isclose(np.abs(bias_E), cfg.bias_update_rate) | (bias_E == 0)) and np.abs(bias_E).sum() > 0


def test_deepseek_v3_balances_its_experts_as_published():
  for name in ('deepseek-v3', 'kimi-k2'):  # the bias moves beside a tiny balance loss (arXiv:2412.19437, 2.1.2)
    cfg = presets.get(name)
    assert (cfg.balance, cfg.bias_update_rate, cfg.lb_loss_weight) == ('both', 0.001, 0.0001)
  cfg = presets.scale_down(presets.get('deepseek-v3'), d_model=32, max_seq_len=16).replace(balance='bias')
  train_cfg = TrainConfig(steps=10, warmup=0, batch_size=2, seq_len=16)
  graphdef, state, tx, opt_state = init_state(cfg, train_cfg)
  step = make_train_step(graphdef, tx, compiler_options=FAST_COMPILE)
  batch_BT1 = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17), dtype=np.int32)
  for _ in range(3):
    state, opt_state, metrics = step(state, opt_state, batch_BT1)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['selection_bias_spread']) > 0
  biases = jax.tree.leaves(nnx.split_state(state, moe.SelectionBias, ...)[0])
  assert len(biases) == cfg.n_moe_layers and all(np.abs(b).max() > 0 for b in biases)
  # balance='bias': the balance loss is reported but left out of the loss
  assert float(metrics['lb_loss']) > 0
  np.testing.assert_allclose(float(metrics['aux_loss']), cfg.z_loss_weight * float(metrics['z_loss']), rtol=1e-6)


def test_new_fields_validate_with_one_line_errors():
  for changes, message in [(dict(attention='mla', n_kv_heads=2), 'attention=mla has no kv heads'),
                           (dict(attention='mla', qkv_bias=True), 'supports neither qkv_bias nor qk_norm'),
                           (dict(qk_norm='layer'), "qk_norm='layer' is not one of"),
                           (dict(n_experts=4, balance='bias'), 'balance=bias needs router_bias=True'),
                           (dict(n_experts=4, router_bias=True, bias_update_rate=-1.0), 'bias_update_rate must be'),
                           (dict(n_experts=4, shared_gate=True), 'shared_gate needs n_shared_experts'),
                           (dict(n_experts=4, router='sigmoid', top_k=1), 'set router_renormalize=False'),
                           (dict(attention='mla', head_dim=16, qk_rope_dim=5), 'qk_rope_dim=5 must be even')]:
    with pytest.raises(ValueError, match=message) as info:
      ModelConfig(**changes)
    assert '\n' not in str(info.value)


def test_preset_ladder_keeps_the_architecture_at_growing_widths():
  ladder = presets.preset_ladder('llama-4-maverick')
  sizes = [counting.analytic_counts(c).total for c in ladder]
  assert sizes == sorted(sizes) and all(c.moe_every == ladder[0].moe_every for c in ladder)
  assert [c.d_model for c in presets.preset_ladder('llama-4-maverick')] == [32, 48, 64, 96, 128]


def test_count_cli_presets_print_the_keys_of_flag_defined_models():
  result = subprocess.run([sys.executable, str(SCRIPT), '--preset=all', '--json'], capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  rows = json.loads(result.stdout)
  expected_keys = set(counting.summary(ModelConfig())) | {'breakdown', 'config', 'preset', 'attention_kind',
                                                          'kv_cache_batch', 'kv_cache_bytes', 'kv_cache_bytes_per_token',
                                                          'kv_cache_context', 'kv_cache_dtype', 'smallest_device_with_kv'}
  assert [row['preset'] for row in rows] == presets.names()
  assert all(set(row) == expected_keys for row in rows)
  for row in rows:
    parts = row['breakdown'].values()
    assert sum(p['total'] for p in parts) == row['total_params']
    assert sum(p['active'] for p in parts) == row['active_params']
  mixtral = rows[presets.names().index('mixtral-8x7b')]
  assert mixtral['total_params'] == 46_702_792_704
  assert mixtral['breakdown']['routed_experts']['total'] == 8 * 32 * 3 * 4096 * 14336
  assert mixtral['smallest_device'] == {'int4': 'gpu-80GB', 'int8': 'gpu-80GB', 'bfloat16': 'node-8x80GB'}
  result = subprocess.run([sys.executable, str(SCRIPT), '--preset=kimi-k2', '--scale_down', '--json'],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  row = json.loads(result.stdout)
  assert set(row) == expected_keys and row['config']['attention'] == 'mla' and row['total_params'] < 2_000_000
