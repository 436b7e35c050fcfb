"""Hugging Face conversion of the MoE families (slmjax/convert): logits equal transformers' (stored fixtures,
tests/scripts/make_hf_fixtures.py), export is bit for bit in the Hub's per-expert layout, counts agree, and a
live rebuild (when transformers is installed) matches too."""

import json

import numpy as np
import pytest

import hf_parity
from slmjax import convert
from slmjax.convert import hf_io

MOE = ('mixtral', 'qwen3_moe', 'qwen2_moe', 'olmoe', 'phimoe', 'deepseek_v3', 'deepseek_v2')


@pytest.mark.parametrize('name', MOE)
def test_logits_match_transformers(name, tmp_path_factory):
  diff = hf_parity.logits_diff(hf_parity.fixture(name))
  hf_parity.record(tmp_path_factory, {'family': name, 'max_abs_logit_diff': diff})
  assert diff <= hf_parity.TOLERANCE


@pytest.mark.parametrize('name', MOE)
def test_export_is_bit_for_bit(name, tmp_path):
  names = hf_parity.export_matches(hf_parity.fixture(name), tmp_path / 'out')
  assert any('.experts.3.' in n for n in names)  # the Hub layout: one tensor per expert


@pytest.mark.parametrize('name', MOE)
def test_counts_equal_counting(name):
  assert hf_parity.counts_match(hf_parity.fixture(name)) > 0


@pytest.mark.parametrize('name', MOE)
def test_imported_moe_is_dropless(name):
  cfg, _ = convert.from_hf(hf_parity.fixture(name))
  assert cfg.is_moe and cfg.dropless and cfg.for_eval().dropless


@pytest.mark.slow
@pytest.mark.parametrize('name', MOE)
def test_live_transformers_rebuild(name, tmp_path):
  """Rebuild the reference with the installed transformers and compare: catches a fixture gone stale."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  maker = hf_parity.live_maker()
  directory = maker.save(name, tmp_path / name)
  assert hf_parity.logits_diff(directory) <= hf_parity.TOLERANCE
  hf_parity.export_matches(directory, tmp_path / 'out')


def test_phimoe_imports_sparsemixer_layernorm_and_biases():
  cfg, _ = convert.from_hf(hf_parity.fixture('phimoe'))
  assert (cfg.router, cfg.sparsemixer_eps, cfg.norm, cfg.qkv_bias, cfg.o_bias, cfg.lm_head_bias) == (
      'sparsemixer', 0.01, 'layernorm', True, True, True)
  hf = json.loads((hf_parity.fixture('phimoe') / 'config.json').read_text())
  with pytest.raises(ValueError, match='sparsemixer routes top-2 only'):
    convert.config_from_hf({**hf, 'num_experts_per_tok': 3})


def test_deepseek_mtp_layers_are_skipped(tmp_path):
  """DeepSeek-V3's multi-token-prediction module sits at layers num_hidden_layers.. (model.layers.61.* on the
  Hub): the import skips it, as transformers does, and reads the same model."""
  directory = hf_parity.fixture('deepseek_v3')
  hf, tensors = hf_io.read_model_dir(directory)
  mtp = {'model.layers.2.eh_proj.weight': np.ones((64, 128), np.float32),
         'model.layers.2.self_attn.o_proj.weight': np.ones((64, 64), np.float32)}
  hf_io.write_model_dir(tmp_path, {**hf, 'num_nextn_predict_layers': 1}, {**tensors, **mtp})
  assert hf_parity.logits_diff(tmp_path, np.load(directory / 'tokens.npy'),
                               np.load(directory / 'logits.npy')) <= hf_parity.TOLERANCE
