"""Meshes and sharding rules: flag parsing, per-device bytes, and sharded steps equal to one device (8 CPUs)."""

import json
import pathlib
import subprocess
import sys

import pytest

import multi_device
from slmjax import sharding
from slmjax.config import ModelConfig
from slmjax.counting import analytic_counts

SCRIPTS = pathlib.Path(__file__).parent / 'scripts'


def test_parse_mesh():
  assert sharding.parse_mesh('data:2,expert:-1', 8) == {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}
  assert sharding.parse_mesh('data:-1', 1) == {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}


@pytest.mark.parametrize('spec, message', [
    ('data:3', 'uses 3 devices but 8 are available'),
    ('data:-1,expert:-1', 'only one axis may be -1'),
    ('pipeline:2', "unknown axis 'pipeline'"),
    ('data:two', "'data:two' is not AXIS:SIZE"),
    ('expert:3,data:-1', 'does not divide the 8 devices'),
    ('data:0', 'has size 0'),
])
def test_bad_mesh_flags(spec, message):
  with pytest.raises(ValueError, match=message) as info:
    sharding.parse_mesh(spec, 8)
  assert '\n' not in str(info.value)


def test_bytes_per_device_splits_experts():
  cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_experts=8, top_k=2, d_expert=16)
  one = sharding.bytes_per_device(cfg, sharding.parse_mesh('data:1', 1), 4)
  assert one == 4 * analytic_counts(cfg).total
  four = sharding.bytes_per_device(cfg, sharding.parse_mesh('expert:4', 4), 4)
  expert_bytes = 4 * 2 * 3 * 8 * 32 * 16  # 2 layers x 3 matrices x E x D x F, float32
  assert four == pytest.approx(one - expert_bytes + expert_bytes / 4 - 4 * 2 * 32 * 8 * 3 / 4)


@pytest.mark.slow
def test_sharded_step_equals_one_device_and_experts_are_split():
  meshes = ['data:8', 'data:2,expert:4', 'fsdp:2,expert:4', 'data:2,tensor:4']
  result = subprocess.run([sys.executable, str(SCRIPTS / 'sharded_step.py'), *meshes], capture_output=True,
                          text=True, env=multi_device.ENV, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for spec in meshes:
    assert report[spec]['loss_diff'] < 1e-5, spec
    assert report[spec]['grad_diff'] < 1e-5, spec
  # Each device holds a quarter of the expert weights on an expert:4 mesh (read from the arrays' shards).
  assert report['data:2,expert:4']['expert_shard_shapes'] == [[2, 32, 16]]
  assert report['fsdp:2,expert:4']['expert_shard_shapes'] == [[2, 16, 16]]
  assert report['data:8']['expert_shard_shapes'] == [[8, 32, 16]]


@pytest.mark.slow
def test_sharded_dropless_step_equals_one_device():
  """The dropless model's ragged dispatch (row tiles with dynamic expert indices on CPU) under expert sharding."""
  result = subprocess.run([sys.executable, str(SCRIPTS / 'sharded_step.py'), '--dropless', 'data:2,expert:4'],
                          capture_output=True, text=True, env=multi_device.ENV, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])['data:2,expert:4']
  assert report['loss_diff'] < 1e-5 and report['grad_diff'] < 1e-5


def test_mesh_that_does_not_divide_the_model_names_the_axis():
  code = ('from flax import nnx; from slmjax import sharding; from slmjax.config import ModelConfig;'
          'from slmjax.model import create_model;'
          'state = nnx.split(create_model(ModelConfig(d_model=32, n_heads=4, n_experts=6, d_expert=16)))[1];'
          'sharding.state_shardings(state, sharding.make_mesh("data:2,expert:4"))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=multi_device.ENV,
                          timeout=300)
  assert result.returncode != 0
  assert '--mesh axis expert:4 does not divide the expert dimension (6)' in result.stderr
