"""Shape suffixes do not lie: every parameter's name spells its shape in the one legend (slmjax/shapes.py)."""

import pathlib
import re

import pytest
from flax import nnx

from slmjax import ModelConfig, abstract_model

SOURCE = pathlib.Path(__file__).resolve().parents[1] / 'slmjax'
SUFFIX = re.compile(r'_([A-Z]{1,6})$')
# Every size distinct, so a parameter named with the wrong letter cannot match by accident.
GQA_MOE = ModelConfig(vocab_size=256, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16, d_ff=72,
                      n_experts=7, top_k=2, d_expert=24, n_shared_experts=1, d_shared=20, first_dense=1,
                      qkv_bias=True, o_bias=True, tie_embeddings=False, lm_head_bias=True, shared_gate=True,
                      router='sigmoid', router_bias=True, qk_norm='head')
MLA = GQA_MOE.replace(attention='mla', n_kv_heads=None, qkv_bias=False, qk_norm='none', q_lora_rank=36,
                      kv_lora_rank=28, qk_rope_dim=10, v_head_dim=18)


def letter_sizes(cfg: ModelConfig) -> dict[str, set[int]]:
  return {'V': {cfg.vocab_size}, 'D': {cfg.d_model}, 'H': {cfg.n_heads}, 'K': {cfg.kv_heads},
          'Z': {cfg.head_size}, 'E': {cfg.n_experts}, 'F': {cfg.ffn_size, cfg.expert_size,
                                                           cfg.n_shared_experts * cfg.shared_size},
          'I': {cfg.q_lora_rank}, 'J': {cfg.kv_rank}, 'R': {cfg.rope_size}, 'O': {cfg.qk_head_size},
          'Y': {cfg.v_head_size}}


@pytest.mark.parametrize('cfg', [GQA_MOE, MLA], ids=['gqa-moe', 'mla'])
def test_every_parameter_name_spells_its_shape(cfg):
  sizes, checked, wrong = letter_sizes(cfg), 0, []
  for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg))):
    match = SUFFIX.search(str(path[-1]))
    if not match:
      assert path[-1] in ('scale', 'bias'), path  # a Norm's gain and bias: the width of what it normalises
      continue
    letters, checked = match.group(1), checked + 1
    if len(letters) != len(var.shape) or any(n not in sizes[a] for a, n in zip(letters, var.shape)):
      wrong.append(f'{"/".join(map(str, path))}: {var.shape}')
  assert checked > 10 and not wrong


def test_modules_point_to_the_legend_instead_of_redefining_letters():
  redefining = [path.name for path in SOURCE.rglob('*.py')
                if re.search(r'(Dimension|Shape) letters:(?! slmjax/shapes\.py)', path.read_text())]
  assert not redefining
