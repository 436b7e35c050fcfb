"""ModelConfig validation: bad configs fail with a one-line message that names the problem."""

import pytest

from slmjax.config import ModelConfig


@pytest.mark.parametrize('changes, message', [
    (dict(n_experts=2, top_k=3), 'top_k=3 must be between 1 and n_experts=2'),
    (dict(n_heads=4, n_kv_heads=3), 'n_kv_heads=3 must divide n_heads=4'),
    (dict(d_model=100, n_heads=3), 'n_heads=3 must divide d_model=100'),
    (dict(d_model=0), 'd_model must be a positive integer'),
    (dict(n_layers=-1), 'n_layers must be a positive integer'),
    (dict(d_ff=0), 'd_ff must be a positive integer or None'),
    (dict(activation='relu'), "activation='relu' is not one of"),
    (dict(n_experts=-1), 'n_experts must be >= 0'),
    (dict(n_experts=4, capacity_factor=0.0), 'capacity_factor must be positive or None'),
    (dict(n_experts=4, first_dense=4, n_layers=4), 'no layer is MoE'),
    (dict(n_experts=4, dispatch='magic'), "dispatch='magic' is not one of"),
    (dict(head_dim=7, d_model=28, n_heads=4), 'head_dim=7 must be even'),
    (dict(lb_loss_weight=-1.0), 'lb_loss_weight must be >= 0'),
])
def test_bad_config_raises_one_line_error(changes, message):
  with pytest.raises(ValueError, match=message) as info:
    ModelConfig(**changes)
  assert '\n' not in str(info.value)


def test_derived_sizes_and_moe_layer_pattern():
  cfg = ModelConfig(d_model=64, n_heads=4, n_layers=6, n_experts=8, first_dense=1, moe_every=2)
  assert (cfg.kv_heads, cfg.head_size, cfg.ffn_size, cfg.expert_size) == (4, 16, 256, 256)
  assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
  assert cfg.n_moe_layers == 3
  assert not ModelConfig().is_moe_layer(0)


def test_capacity_formula():
  cfg = ModelConfig(n_experts=8, top_k=2, capacity_factor=1.25)
  assert cfg.capacity(64) == 20  # ceil(1.25 * 64 * 2 / 8)
  assert cfg.replace(capacity_factor=None).capacity(64) == 64  # dropless: room for the whole group
  assert cfg.replace(capacity_factor=100.0).capacity(64) == 64  # never more slots than tokens


def test_dict_round_trip_and_unknown_field():
  cfg = ModelConfig(n_experts=4, top_k=1, d_expert=32)
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match='unknown ModelConfig fields'):
    ModelConfig.from_dict({**cfg.to_dict(), 'n_expert': 3})
