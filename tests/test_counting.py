"""Parameter counts: the closed form from the config equals the real module tree, in every variant."""

import jax.numpy as jnp
import pytest
from flax import nnx

from slmjax import counting
from slmjax.config import ModelConfig
from slmjax.model import abstract_model

BASE = ModelConfig(d_model=48, n_layers=3, n_heads=4, d_ff=96, vocab_size=300)
VARIANTS = {
    'dense': BASE,
    'dense-gqa-untied': BASE.replace(n_kv_heads=2, tie_embeddings=False),
    'dense-head_dim': BASE.replace(head_dim=16, n_heads=6, n_kv_heads=2),
    'dense-gelu-layernorm': BASE.replace(activation='gelu', norm='layernorm'),
    'moe': BASE.replace(n_experts=8, top_k=2, d_expert=40),
    'moe-shared': BASE.replace(n_experts=8, top_k=2, d_expert=40, n_shared_experts=2, d_shared=24),
    'moe-every-2nd': BASE.replace(n_experts=4, top_k=1, moe_every=2),
    'moe-first-dense-untied': BASE.replace(n_experts=4, top_k=2, first_dense=1, tie_embeddings=False),
}


@pytest.mark.parametrize('name', VARIANTS)
def test_analytic_counts_equal_module_tree(name):
  cfg = VARIANTS[name]
  assert counting.analytic_counts(cfg) == counting.module_counts(cfg)


def test_hand_count_of_a_small_moe():
  cfg = ModelConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=2, d_ff=6, n_experts=4, top_k=1, d_expert=3)
  attention = 4 * 4 * 4  # q, k, v, o: each 4 x (2 heads x 2)
  norms = 3 * 4  # attention norm, ffn norm, final norm
  router = 4 * 4
  experts = 4 * 3 * 4 * 3  # 4 experts x 3 matrices x d_model 4 x width 3
  counts = counting.analytic_counts(cfg)
  assert counts.embedding == 40
  assert counts.non_embedding == attention + norms + router + experts
  assert counts.active_non_embedding == attention + norms + router + experts // 4
  assert counts.active_matmul == attention + router + experts // 4 + 40


def test_dense_and_matched_moe_have_equal_active_params():
  dense = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=256)
  moe = dense.replace(n_experts=8, top_k=2, d_expert=128)
  d, m = counting.analytic_counts(dense), counting.analytic_counts(moe)
  assert m.active - d.active == 2 * 64 * 8  # only the two routers differ
  assert m.total > 3 * d.total


def test_flops_per_token_convention():
  cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128)
  counts = counting.analytic_counts(cfg)
  assert counting.train_flops_per_token(cfg) == 6 * counts.active_matmul + 6 * 2 * 128 * 64
  summary = counting.summary(cfg, seq_len=64)
  assert summary['train_flops_per_token'] == 6 * counts.active_matmul + 6 * 2 * 64 * 64
  assert summary['weight_bytes'] == {'float32': 4 * counts.total, 'bfloat16': 2 * counts.total,
                                     'int8': counts.total, 'int4': counts.total // 2}


def test_counts_come_from_roles_not_attribute_names():
  """A weight is counted by the role in its metadata: renamed, it counts the same; without a role, it is an error."""
  cfg = VARIANTS['moe-shared']
  model = abstract_model(cfg)
  weights = counting.stored_weights(model)
  assert {w.role for w in weights} == {'tied_embedding', 'attention', 'norm', 'routed_expert', 'router',
                                       'shared_expert'}
  by_role = lambda: {r: sum(w.size for w in counting.stored_weights(model) if w.role == r)  # noqa: E731
                     for r in counting.ROLES}
  before = by_role()
  ffn = model.blocks[0].ffn
  ffn.w_renamed_EDF = ffn.w_up_EDF
  del ffn.w_up_EDF
  assert 'w_renamed_EDF' in {w.path[-1] for w in counting.stored_weights(model)} and by_role() == before
  model.blocks[0].extra = nnx.Param(jnp.zeros(3))
  with pytest.raises(ValueError, match='blocks/0/extra: role None is not one of'):
    counting.stored_weights(model)


def test_checked_counts_and_describe(monkeypatch):
  cfg = VARIANTS['moe']
  assert counting.checked_counts(cfg) == counting.analytic_counts(cfg)
  row = counting.describe(cfg, 64, 'tiny', {'data': 1, 'fsdp': 1, 'expert': 2, 'tensor': 1})
  assert row['preset'] == 'tiny' and row['seq_len'] == 64 and row['config'] == cfg.to_dict()
  assert sum(part['total'] for part in row['breakdown'].values()) == row['total_params']
  assert row['weight_bytes']['float32'] > row['weight_bytes_per_device']['float32'] > 0
  assert 'mesh' not in counting.describe(cfg)
  monkeypatch.setattr(counting, 'analytic_counts', lambda cfg: counting.ParamCounts(0, 0, 0, 0, 0))
  with pytest.raises(RuntimeError, match='disagrees with analytic'):
    counting.checked_counts(cfg)
