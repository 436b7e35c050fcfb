"""Expert parallelism by all-to-all (slmjax/dispatch/alltoall.py) on 8 simulated CPU devices: results equal one
device, and the compiled programs move tokens by all-to-all, never by all-gather over the expert axis."""

import json
import pathlib
import subprocess
import sys

import pytest

import multi_device
from slmjax import collectives, dispatch

SCRIPTS = pathlib.Path(__file__).parent / 'scripts'


def case(experts, mesh, dropless=False, name='alltoall', ragged=False):
  return {'experts': experts, 'top_k': 2 if experts == 8 else 4, 'dropless': dropless, 'mesh': mesh,
          'dispatch': name, 'ragged': ragged}


LAYER = [case(e, f'data:{8 // ep},expert:{ep}' if ep < 8 else 'expert:8') for e in (8, 64) for ep in (2, 4, 8)]
LAYER += [case(8, 'expert:4,tensor:2'), case(64, 'expert:8', dropless=True), case(8, 'data:2,expert:4', name='gather'),
          case(64, 'expert:4,tensor:2', dropless=True, ragged=True)]  # GPU / TPU's ragged exchange, emulated


def run_cases(cases):
  result = subprocess.run([sys.executable, str(SCRIPTS / 'ep_step.py'), json.dumps(cases)], capture_output=True,
                          text=True, env=multi_device.ENV, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def layer_report():
  return run_cases({'layer': LAYER})['layer']


def test_alltoall_equals_one_device(layer_report):
  for row in layer_report:
    assert row['grad_diff'] < 1e-5, row  # gradients w.r.t. tokens, gates and expert weights
    assert row['kept'] == row['ref_kept'], row  # the same assignments dropped (capacity) or none (dropless)
  assert min(row['kept'] for row in layer_report) < 1  # some configurations drop, so the drops are compared


def test_tokens_cross_the_expert_axis_by_all_to_all(layer_report):
  for row in layer_report:
    if row['ragged']:
      continue  # its exchange is emulated with all-gathers (tests/scripts/ep_step.py)
    if row['dispatch'] == 'alltoall':
      # There and back, forward and backward (the dropless layer also exchanges its row counts).
      assert row['expert_all_to_alls'] == (5 if row['dropless'] else 4), row
      assert row['expert_all_gathers'] == [], row
      assert 'all-gather' not in row['summary'], row
    else:  # today's partitioner path all-gathers token rows [X/2, D] over the expert axis
      assert row['expert_all_to_alls'] == 0
      assert any(shapes == [[128, 16]] for shapes, _ in row['expert_all_gathers']), row


def test_auto_picks_alltoall_on_an_expert_mesh_only():
  assert dispatch.resolve('auto') == 'gather'
  code = ('import jax; from slmjax import dispatch, sharding;'
          'print([dispatch.resolve("auto", d) for m in ("data:2,expert:4", "data:8") for d in (False, True)'
          '       for _ in [jax.set_mesh(sharding.make_mesh(m)).__enter__()]])')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=multi_device.ENV,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "['alltoall', 'alltoall', 'gather', 'ragged']"


def test_collective_parser_reads_every_group_format():
  hlo = '\n'.join([
      "  %a = f32[8,16]{1,0} all-to-all(f32[8,16]{1,0} %x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}",
      "  %b = f32[32,8]{1,0} all-gather(%y), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}",
      "  %c = (f32[4], bf16[2,2]) all-reduce(%p, %q), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add",
      "  %d = f32[4]{0} all-reduce(%r), replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}, to_apply=%add",
      "  ROOT %e = f32[2]{0} collective-permute(%s), source_target_pairs={{0,4},{4,0}}"])
  found = collectives.collectives(hlo, {'data': 2, 'expert': 4})
  assert [(c.kind, c.bytes, c.axes) for c in found] == [
      ('all-to-all', 512, ('expert',)), ('all-gather', 1024, ('data',)), ('all-reduce', 24, ('data',)),
      ('collective-permute', 8, ('data',))]
  assert collectives.summary(found)['all-reduce'] == {'count': 1, 'bytes': 24}


@pytest.mark.slow
def test_model_step_on_mixed_meshes_equals_one_device():
  """Whole models (router, attention, embeddings): loss and gradients, and the step's collectives."""
  # (E=64 on expert:8 dropless and the gather dispatch on data:2,expert:4 are covered as layers above.)
  model = [case(8, 'data:2,expert:4'), case(8, 'fsdp:2,expert:4'), case(8, 'expert:4,tensor:2', dropless=True)]
  layer = [case(8, 'fsdp:2,expert:4', dropless=True), case(8, 'data:2,expert:4', dropless=True, ragged=True)]
  report = run_cases({'model': model, 'layer': layer})
  for row in report['model'] + report['layer']:
    assert row['grad_diff'] < 1e-5, row
  for row in report['model']:
    assert row['loss_diff'] < 1e-5, row
    assert row['expert_all_to_alls'] >= 4, row
    # Over the expert axis only the router's pieces are all-gathered: its [D, E] weight (split on E) and the
    # [X, E] probabilities top_k gathers (the router's own layout, outside the dispatch); with fsdp also the
    # embedding lookup's rows (the model's, outside the dispatch).
    ops = {op.rsplit('/', 1)[-1] for _, op in row['expert_all_gathers']}
    assert ops <= {'dot_general', 'top_k', 'gather'}, row
    assert not any('shard_map' in op for _, op in row['expert_all_gathers']), row
