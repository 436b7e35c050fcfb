"""The training loop: config checks, optimizer, exact resume, NaN handling, the script's errors, cost helpers."""

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from slmjax import ModelConfig, abstract_model, checkpoint, cost, optim
from slmjax import steps as steps_lib
from slmjax import train as train_lib
from slmjax.config import TrainConfig
from slmjax.moe import SelectionBias
from slmjax.train import train
from test_presets import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
MOE = ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=32, n_experts=4, top_k=2)
SMALL = TrainConfig(steps=12, batch_size=4, seq_len=32, warmup=2, eval_every=6, eval_batches=1, log_every=1,
                    checkpoint_every=0)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv('SLMJAX_CACHE_DIR', str(tmp_path_factory.getbasetemp() / 'slmjax-cache'))


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """SMALL trained straight through (MoE), shared by the tests that compare against it."""
  out = tmp_path_factory.mktemp('straight')
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('SLMJAX_CACHE_DIR', str(tmp_path_factory.getbasetemp() / 'slmjax-cache'))
    return out, train(MOE, SMALL, out, log=None)


def read_metrics(out) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(out) / 'metrics.jsonl').read_text().splitlines()]


def losses(rows: list[dict]) -> list[tuple]:
  keys = ('step', 'train_loss', 'eval_loss', 'grad_norm', 'lb_loss', 'z_loss', 'drop_fraction')
  return [tuple(r.get(k) for k in keys) for r in rows]


# Resuming is bit for bit on CPU. XLA:GPU's reductions are not deterministic run to run (on an H200 resumed
# losses differed from straight ones in the 7th digit), so elsewhere the same runs must agree to float rounding.
EXACT = jax.default_backend() == 'cpu'


def assert_same(a, b) -> None:
  """`a == b` on CPU; on GPU / TPU the same structure (None where None) and values within 1e-5."""
  if EXACT:
    assert a == b
    return
  flat_a, flat_b = jax.tree.leaves(a, is_leaf=lambda x: x is None), jax.tree.leaves(b, is_leaf=lambda x: x is None)
  assert [x is None for x in flat_a] == [y is None for y in flat_b]
  np.testing.assert_allclose([x for x in flat_a if x is not None], [y for y in flat_b if y is not None], rtol=1e-5)


def restore_latest(out, model_cfg=MOE):
  graphdef, state, _, opt_state = steps_lib.init_state(model_cfg, SMALL)
  with checkpoint.Checkpointer(pathlib.Path(out) / 'checkpoints') as ck:
    step = ck.latest_step()
    state, opt_state, data_state, _ = ck.restore(step, state, opt_state)
  return step, state, opt_state, data_state


@pytest.mark.parametrize('changes,match', [
    ({'steps': 0}, 'steps'), ({'batch_size': -1}, 'batch_size'), ({'lr': 0.0}, 'lr'),
    ({'warmup': 20}, 'warmup'), ({'eval_fraction': 1.0}, 'eval_fraction'), ({'seq_len': 0}, 'seq_len'),
    ({'schedule': 'wsd', 'warmup': 0, 'branches': '0.5,2'}, r"'2' must be a fraction of the run in \(0, 1\]"),
    ({'schedule': 'wsd', 'warmup': 0, 'branches': '0.01'}, "'0.01' of a 12-step run is no step at all"),
])
def test_train_config_rejects_nonsense(changes, match):
  with pytest.raises(ValueError, match=match) as e:
    SMALL.replace(**changes)
  assert '\n' not in str(e.value)


def test_config_round_trip():
  assert TrainConfig.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL
  with pytest.raises(ValueError, match='unknown'):
    TrainConfig.from_dict({'stepz': 3})


def test_schedule_and_weight_decay_mask():
  cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
  schedule = optim.lr_schedule(cfg)
  assert float(schedule(0)) == 0 and math.isclose(float(schedule(5)), 5e-4, rel_tol=1e-5)
  assert math.isclose(float(schedule(10)), 1e-3, rel_tol=1e-5)
  assert math.isclose(float(schedule(100)), 1e-4, rel_tol=1e-5)
  assert float(schedule(10)) > float(schedule(50)) > float(schedule(90))
  _, params = nnx.split(abstract_model(MOE.replace(norm='layernorm')), nnx.Param)
  mask = nnx.to_flat_state(optim.decay_mask(params))
  decayed = {str(path[-1]) for path, v in mask if v.get_value()}
  kept = {str(path[-1]) for path, v in mask if not v.get_value()}
  assert kept == {'scale', 'bias'} and 'embed_VD' in decayed and 'w_up_EDF' in decayed


def test_train_step_learns_and_reports_router_metrics():
  graphdef, state, _, opt_state = steps_lib.init_state(MOE, SMALL)
  state, opt_state = steps_lib.on_first_device(state, opt_state)  # as train() places it: one compile per session
  step, _ = steps_lib.cached_steps(graphdef, SMALL)
  batch = np.random.default_rng(0).integers(0, 256, (4, 33)).astype(np.int32)
  first = None
  for _ in range(12):
    state, opt_state, metrics = step(state, opt_state, batch)
    first = first if first is not None else float(metrics['ce'])
  assert float(metrics['ce']) < first - 0.5  # memorises the fixed batch
  assert set(metrics) >= {'loss', 'ce', 'aux_loss', 'lb_loss', 'z_loss', 'drop_fraction', 'router_entropy',
                          'expert_load_max_over_mean', 'grad_norm'}
  assert 1.0 <= float(metrics['expert_load_max_over_mean']) <= MOE.n_experts
  np.testing.assert_allclose(float(metrics['loss']), float(metrics['ce'] + metrics['aux_loss']), rtol=1e-6)


def test_resume_is_exact(straight, tmp_path):
  out_a, summary_a = straight
  partial = train(MOE, SMALL, tmp_path, log=None, stop_at_step=5)
  assert partial['step'] == 5 and not partial['complete'] and not (tmp_path / 'summary.json').exists()
  summary_b = train(MOE, SMALL, tmp_path, log=None)
  assert summary_b['step'] == 12 and summary_b['complete']
  assert_same(losses(read_metrics(tmp_path)), losses(read_metrics(out_a)))  # bit-identical on CPU, every step
  assert_same((summary_b['train_loss'], summary_b['eval_loss']), (summary_a['train_loss'], summary_a['eval_loss']))
  _, state_a, opt_a, data_a = restore_latest(out_a)
  _, state_b, opt_b, data_b = restore_latest(tmp_path)
  assert data_a == data_b
  for x, y in zip(jax.tree.leaves((state_a, opt_a)), jax.tree.leaves((state_b, opt_b))):
    if EXACT:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-4, atol=1e-6)


def test_metrics_and_files(straight):
  out, summary = straight
  assert {p.name for p in out.iterdir()} == {'config.json', 'metrics.jsonl', 'summary.json', 'checkpoints'}
  config = json.loads((out / 'config.json').read_text())
  assert ModelConfig.from_dict(config['model']) == MOE and TrainConfig.from_dict(config['train']) == SMALL
  rows = read_metrics(out)
  assert [r['step'] for r in rows] == list(range(13))
  assert set(rows[0]) == {'step', 'tokens', 'eval_loss', 'eval_bpb', 'eval_drop_fraction'}
  assert rows[0]['eval_drop_fraction'] == 0.0 and rows[5]['drop_fraction'] > 0  # evaluated dropless, trained at 1.25
  assert {'train_loss', 'lr', 'tokens_per_s', 'lb_loss', 'z_loss', 'aux_loss', 'drop_fraction',
          'expert_load_max_over_mean', 'train_total_loss'} <= set(rows[5])
  assert 'eval_loss' in rows[6] and 'eval_loss' not in rows[5]
  assert summary['tokens'] == 12 * SMALL.tokens_per_step and summary['tokens_per_s'] > 0
  assert summary['total_params'] > summary['active_params'] > 0 and summary['train_flops_per_token'] > 0


def test_rerun_of_a_finished_run_returns_its_summary(straight):
  out, summary = straight
  before = snapshot(out)
  assert train(MOE, SMALL, out, log=None) == summary
  assert snapshot(out) == before


@pytest.mark.slow
def test_more_steps_continue_the_run(straight, tmp_path):
  out, _ = straight
  shutil.copytree(out, tmp_path / 'run')
  longer = train(MOE, SMALL.replace(steps=15), tmp_path / 'run', log=None)
  assert longer['step'] == 15 and [r['step'] for r in read_metrics(tmp_path / 'run')][-3:] == [13, 14, 15]


def snapshot(directory) -> dict:
  return {p: p.read_bytes() for p in sorted(pathlib.Path(directory).rglob('*')) if p.is_file()}


@pytest.mark.parametrize('model_cfg,train_cfg,match', [
    (MOE.replace(d_model=64), SMALL, 'different architecture'),
    (MOE.replace(n_experts=0), SMALL, 'different architecture'),
    (MOE, SMALL.replace(lr=1e-2), 'other training settings'),
    (MOE, SMALL.replace(steps=8), 'already at step 12'),
])
def test_refuses_to_mix_runs_and_touches_nothing(straight, model_cfg, train_cfg, match):
  out, _ = straight
  before = snapshot(out)
  with pytest.raises(ValueError, match=match):
    train(model_cfg, train_cfg, out, log=None)
  assert snapshot(out) == before


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = SMALL.replace(lr=1e30, warmup=0, checkpoint_every=1, eval_every=0)  # diverges for real
  with pytest.raises(train_lib.NonFiniteLossError, match='last good checkpoint is step') as e:
    train(MOE, cfg, tmp_path, log=None)
  bad_step = read_metrics(tmp_path)[-1]['step']
  assert 'error' in read_metrics(tmp_path)[-1] and f'step {bad_step}' in str(e.value)
  step, state, opt_state, _ = restore_latest(tmp_path)
  assert step < bad_step and bool(steps_lib.all_finite((state, opt_state)))


def test_nan_between_logs_is_caught_before_the_save(tmp_path, monkeypatch):
  real = train_lib.cached_steps

  def poisoned(graphdef, cfg, *eval_graph):
    step_fn, eval_fn = real(graphdef, cfg, *eval_graph)
    calls = [0]
    def step(state, opt_state, batch):
      calls[0] += 1
      state, opt_state, metrics = step_fn(state, opt_state, batch)
      return state, opt_state, {**metrics, 'loss': metrics['loss'] * (jnp.nan if calls[0] == 6 else 1.0)}
    return step, eval_fn
  monkeypatch.setattr(train_lib, 'cached_steps', poisoned)
  cfg = SMALL.replace(checkpoint_every=4, log_every=100, eval_every=0)
  with pytest.raises(train_lib.NonFiniteLossError, match='step 6: loss nan.*last good checkpoint is step 4'):
    train(MOE, cfg, tmp_path, log=None)
  with checkpoint.Checkpointer(tmp_path / 'checkpoints') as ck:
    assert ck.all_steps() == [4]  # step 8 was never saved


def test_runs_in_memory_skips_only_out_of_memory_errors():
  def raising(message):
    def fn():
      raise jax.errors.JaxRuntimeError(message)
    return fn
  assert cost.runs_in_memory(lambda: jnp.ones(3))
  assert not cost.runs_in_memory(raising('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 64.02GiB'))
  with pytest.raises(jax.errors.JaxRuntimeError, match='INVALID_ARGUMENT'):
    cost.runs_in_memory(raising('INVALID_ARGUMENT: shapes differ'))


def test_cost_helpers():
  peak = cost.matmul_peak_flops(256, repeats=3)
  assert peak > 1e8 and cost.matmul_peak_flops(256, repeats=3) == peak  # measured once, then cached
  row = cost.throughput(1000, 0.5, 6e6, peak_flops=1.2e10)
  assert row['tokens_per_s'] == 2000 and row['achieved_flops_per_s'] == 1.2e10 and row['mfu'] == 1.0
  graphdef, state, _, opt_state = steps_lib.init_state(MOE, SMALL)
  state, opt_state = steps_lib.on_first_device(state, opt_state)
  step, _ = steps_lib.cached_steps(graphdef, SMALL)
  batch = np.zeros((4, 33), np.int32)
  stats, state, opt_state = cost.time_train_step(step, state, opt_state, batch, warmup=1, repeats=2)
  assert stats['median_s'] > 0 and bool(steps_lib.all_finite(state))
  runs = {'a': [step, state, opt_state, batch], 'b': [step, *steps_lib.on_first_device(
      *steps_lib.init_state(MOE, SMALL)[1::2]), batch]}
  first_states = [run[1] for run in runs.values()]
  stats = cost.time_train_steps(runs, warmup=0, repeats=2)  # interleaved, states threaded through in place
  assert set(stats) == {'a', 'b'} and all(s['min_s'] <= s['median_s'] for s in stats.values())
  assert all(run[1] is not first for run, first in zip(runs.values(), first_states))


# experiments/train.py end to end.
def script(*args) -> list[str]:
  return [sys.executable, str(ROOT / 'experiments' / 'train.py'), '--mfu=false', *args]


def run_script(*args):
  return subprocess.run(script(*args), capture_output=True, text=True, cwd=ROOT, timeout=300)


SCRIPT_ARGS = ('--d_model=32', '--n_layers=1', '--n_heads=2', '--seq_len=32', '--batch_size=4', '--warmup=2')


@pytest.mark.slow
@pytest.mark.parametrize('bad', [
    ['--data=/no/such/corpus/*.txt'], ['--data={empty}'], ['--seq_len=4096', '--data={small}'],
    ['--steps=0'], ['--batch_size=0'], ['--steps=-3'],
])
def test_script_bad_input_is_one_line_and_writes_nothing(tmp_path, bad):
  (tmp_path / 'empty.txt').write_text('')
  (tmp_path / 'small').mkdir()
  for i in range(3):
    (tmp_path / 'small' / f'{i}.txt').write_text(f'document {i} ' * 50)
  bad = [a.format(empty=tmp_path / 'empty.txt', small=tmp_path / 'small') for a in bad]
  result = run_script(*SCRIPT_ARGS, f'--out={tmp_path / "run"}', *bad)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('train.py: error: '), result.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_script_refuses_other_architecture_in_out(straight):
  out, _ = straight
  before = snapshot(out)
  result = run_script(*SCRIPT_ARGS, f'--out={out}')
  assert result.returncode == 2 and 'different architecture' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and snapshot(out) == before


@pytest.mark.slow
def test_script_continues_to_a_larger_steps_without_warmup_given(tmp_path):
  """A short run's default warmup is steps // 10 (4 of 40); continued to --steps=80 it keeps that warmup (8 would
  be a run with other settings) instead of refusing."""
  args = [a for a in SCRIPT_ARGS if not a.startswith('--warmup')] + ['--eval_batches=1', f'--out={tmp_path / "run"}']
  first = run_script(*args, '--steps=40')
  assert first.returncode == 0, first.stderr
  more = run_script(*args, '--steps=80')
  assert more.returncode == 0, more.stderr
  assert 'resuming' in more.stdout
  config = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert (config['train']['steps'], config['train']['warmup']) == (80, 4)


@pytest.mark.slow
def test_kill_dash_9_then_rerun_matches_a_straight_run(tmp_path):
  args = (*SCRIPT_ARGS, '--steps=150', '--checkpoint_every=20', '--eval_every=50', '--log_every=10',
          '--eval_batches=2')
  straight_run = run_script(*args, f'--out={tmp_path / "straight"}')
  assert straight_run.returncode == 0, straight_run.stderr
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(script(*args, f'--out={killed}'), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (killed / 'checkpoints' / '20').exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
  assert not (killed / 'summary.json').exists()
  rerun = run_script(*args, f'--out={killed}')
  assert rerun.returncode == 0, rerun.stderr
  assert 'resuming' in rerun.stdout
  assert_same(losses(read_metrics(killed)), losses(read_metrics(tmp_path / 'straight')))


def test_place_state_hook_places_fresh_and_restored_state(tmp_path):
  calls = []

  def place(state, opt_state):
    calls.append(len(jax.tree.leaves(state)))
    return jax.device_put((state, opt_state), jax.local_devices()[0])
  train(MOE, SMALL, tmp_path, log=None, stop_at_step=2, place_state=place)
  train(MOE, SMALL, tmp_path, log=None, stop_at_step=3, place_state=place)
  assert len(calls) == 2 and calls[0] > 0
  assert [r['step'] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_a_step_that_cannot_fit_in_memory_is_refused_before_anything_is_written(tmp_path):
  wide = SMALL.replace(batch_size=4096, seq_len=1024)  # attention scores alone: 4096 x 2 x 1024^2 x 4 B = 34 GB
  with pytest.raises(ValueError, match=r'the train step \(batch 4096 x seq_len 1024\) needs [\d,.]+ GB .* but the '
                                       r'.* is [\d,.]+ GB; shrink --batch_size') as e:
    train(MOE.replace(max_seq_len=1024), wide, tmp_path / 'run', log=None)
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'run').exists()


def test_a_fresh_run_that_fails_before_its_first_checkpoint_leaves_no_directory(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError('disk on fire')
  monkeypatch.setattr(checkpoint.Checkpointer, 'save', broken)
  with pytest.raises(RuntimeError, match='disk on fire'):
    train(MOE, SMALL.replace(steps=4, warmup=0), tmp_path / 'run', log=None)
  assert not (tmp_path / 'run').exists()


def test_a_run_killed_before_its_first_checkpoint_is_started_over_with_new_settings(tmp_path, monkeypatch):
  """A kill leaves config.json and metrics.jsonl but no checkpoint: nothing to resume, so the next run, with other
  training settings, starts over there instead of refusing; failing in turn, it leaves no directory."""
  def killed(*args, **kwargs):
    raise KeyboardInterrupt  # as if killed: the clean-up below is undone by hand
  out = tmp_path / 'run'
  with monkeypatch.context() as m:
    m.setattr(checkpoint.Checkpointer, 'save', killed)
    m.setattr(shutil, 'rmtree', lambda *a, **k: None)  # a kill never reaches the clean-up
    with pytest.raises(KeyboardInterrupt):
      train(MOE, SMALL.replace(steps=4, warmup=0), out, log=None)
  assert (out / 'config.json').exists() and checkpoint.latest_step(out / 'checkpoints') is None
  summary = train(MOE, SMALL.replace(steps=6, warmup=1, lr=1e-3), out, log=None)
  assert summary['step'] == 6 and json.loads((out / 'config.json').read_text())['train']['lr'] == 1e-3


@pytest.mark.parametrize('content', ['{"model": {', '[]', '{"model": {}, "train": {}}'])
def test_a_corrupt_config_json_is_a_one_line_error(tmp_path, content):
  (tmp_path / 'config.json').write_text(content)
  with pytest.raises(ValueError, match='config.json is not a run config slmjax wrote') as e:
    train(MOE, SMALL, tmp_path, log=None)
  assert '\n' not in str(e.value) and (tmp_path / 'config.json').read_text() == content


def test_interleaved_times_pairs_each_sample_with_the_baseline(monkeypatch):
  # A fake clock that only the thunks advance: real sleeps on a loaded 2-core CI machine overshoot (a 2 ms
  # sleep read 2.7x too long there) and made this test flaky.
  clock = [0.0]
  monkeypatch.setattr(cost, 'time', types.SimpleNamespace(perf_counter=lambda: clock[0]))
  costs = lambda s: (lambda: clock.__setitem__(0, clock[0] + s))
  stats = cost.interleaved_times({'base': costs(0.002), 'x4': costs(0.008), 'x40': costs(0.08)}, warmup=0,
                                 repeats=4, baseline='base', max_ratio=10)
  assert stats['x4']['ratio'] == pytest.approx(4) and stats['x4']['samples'] == 4
  assert stats['x4']['median_s'] == pytest.approx(0.008)
  assert stats['x40']['samples'] == 1 and stats['x40']['ratio'] > 10  # too slow: timed once only


def truncate_largest_array_file(step_dir: pathlib.Path) -> None:
  largest = max((p for p in (step_dir / 'state').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:200])


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path):
  out_a, summary_a = straight
  cfg = SMALL.replace(checkpoint_every=4)
  train(MOE, cfg, tmp_path, log=None, stop_at_step=8)
  truncate_largest_array_file(tmp_path / 'checkpoints' / '8')
  lines = []
  summary = train(MOE, cfg, tmp_path, log=lines.append)
  assert any('checkpoint step 8' in line and 'cannot be restored' in line for line in lines)
  assert any('resuming' in line and 'from step 4' in line for line in lines)
  assert (summary['train_loss'], summary['eval_loss']) == (summary_a['train_loss'], summary_a['eval_loss'])
  assert [p.name.split('-')[0] for p in (tmp_path / 'checkpoints.corrupt').iterdir()] == ['8']


def test_every_checkpoint_unreadable_is_a_one_line_error(tmp_path):
  cfg = SMALL.replace(checkpoint_every=4)
  train(MOE, cfg, tmp_path, log=None, stop_at_step=4)
  truncate_largest_array_file(tmp_path / 'checkpoints' / '4')
  with pytest.raises(ValueError, match=r'no checkpoint in .* can be restored \(steps \[4\]') as e:
    train(MOE, cfg, tmp_path, log=None)
  assert '\n' not in str(e.value)


# Auxiliary-loss-free balancing (balance='bias'): a sigmoid router whose experts 0 and 1 are favoured on purpose.
SKEWED = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=32, n_experts=8, top_k=2,
                     router='sigmoid', router_bias=True, capacity_factor=None, lb_loss_weight=0.0)
STILL = TrainConfig(steps=100, warmup=0, lr=1e-9, batch_size=8, seq_len=32)  # lr ~ 0: only the bias moves


def skewed_run(model_cfg: ModelConfig, train_cfg: TrainConfig, steps: int):
  """`steps` train steps on one fixed batch with experts 0 and 1 favoured: +1 on each of their router weights
  (a token's normed input sums to a few units, so their scores saturate, high for about half the tokens).
  Returns each step's max/mean expert load [N], the bias before each step and after the last [N+1, E], the
  final state and the batch."""
  graphdef, state, tx, opt_state = steps_lib.init_state(model_cfg, train_cfg)
  router = state['blocks'][0]['ffn']['w_router_DE']
  router[...] = router[...].at[:, :2].add(1.0)
  step = steps_lib.make_train_step(graphdef, tx, compiler_options=FAST_COMPILE)
  batch_BT1 = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (train_cfg.batch_size,
                                                train_cfg.seq_len + 1), dtype=np.int32)
  loads_N, bias_NE = [], [np.array(state['blocks'][0]['ffn']['b_select_E'][...])]
  for _ in range(steps):
    state, opt_state, metrics = step(state, opt_state, batch_BT1)
    loads_N.append(float(metrics['expert_load_max_over_mean']))
    bias_NE.append(np.array(state['blocks'][0]['ffn']['b_select_E'][...]))  # a copy: the buffer is donated
  return np.array(loads_N), np.stack(bias_NE), state, batch_BT1


def assert_only_balancing_steps(bias_NE: np.ndarray, rate: float) -> None:
  """Every step moved each bias entry by exactly +-rate (or 0 at exactly the mean load): the balancing rule,
  nothing from gradients or weight decay."""
  step_NE = np.abs(np.diff(bias_NE, axis=0))
  assert step_NE.max() > 0
  np.testing.assert_allclose(step_NE[step_NE > 0], rate, rtol=1e-4)


def test_bias_balancing_evens_out_a_skewed_router_and_the_loss_free_baseline_does_not():
  rate = 0.01
  loads_N, bias_NE, _, _ = skewed_run(SKEWED.replace(balance='bias', bias_update_rate=rate), STILL, 40)
  assert loads_N[0] > 1.7  # experts 0 and 1 take 44% of the assignments (their fair share: 25%)
  assert loads_N[-10:].mean() < 1.35 and loads_N[-10:].max() < 1.45  # within a few bias steps of even
  assert_only_balancing_steps(bias_NE, rate)
  assert bias_NE[-1, :2].max() < 0 < bias_NE[-1, 2:].max()  # the favoured experts pushed down
  still_N, bias_NE, _, _ = skewed_run(SKEWED, STILL, 40)  # balance='aux_loss' with lb_loss_weight 0
  assert still_N[0] == loads_N[0] and still_N.min() > 1.7
  np.testing.assert_array_equal(bias_NE, 0.0)


def test_the_selection_bias_gets_no_gradient_and_adamw_never_touches_it():
  learning = TrainConfig(steps=100, warmup=0, lr=1e-2, weight_decay=1.0, batch_size=8, seq_len=32)
  _, bias_NE, state, batch_BT1 = skewed_run(SKEWED.replace(balance='bias'), learning, 4)
  assert_only_balancing_steps(bias_NE, SKEWED.bias_update_rate)
  _, bias_NE, state, _ = skewed_run(SKEWED, learning, 4)
  np.testing.assert_array_equal(bias_NE, 0.0)  # balance='aux_loss': exactly zero, while the weights learn
  assert not np.allclose(state['blocks'][0]['ffn']['w_router_DE'][:, 2:], 0.0)
  graphdef = nnx.graphdef(abstract_model(SKEWED))
  params, biases, other = nnx.split_state(state, nnx.Param, SelectionBias, ...)
  biases['blocks'][0]['ffn']['b_select_E'][...] = jnp.linspace(-0.5, 0.5, SKEWED.n_experts)
  grads = jax.jit(jax.grad(lambda b: steps_lib.loss_fn(nnx.merge(graphdef, params, b, other), batch_BT1)[0]),
                  compiler_options=FAST_COMPILE)(biases)
  np.testing.assert_array_equal(grads['blocks'][0]['ffn']['b_select_E'][...], 0.0)


def test_the_selection_bias_survives_checkpoint_and_resume(tmp_path):
  cfg = MOE.replace(router_bias=True, balance='bias', bias_update_rate=0.01)  # any router takes a bias
  train(cfg, SMALL, tmp_path / 'a', log=None)
  train(cfg, SMALL, tmp_path / 'b', log=None, stop_at_step=5)
  train(cfg, SMALL, tmp_path / 'b', log=None)
  rows_a, rows_b = read_metrics(tmp_path / 'a'), read_metrics(tmp_path / 'b')
  spread = [r.get('selection_bias_spread') for r in rows_a]
  assert spread == [r.get('selection_bias_spread') for r in rows_b] and spread[1] == 0 < spread[-1]
  _, state_a, opt_a, _ = restore_latest(tmp_path / 'a', cfg)
  _, state_b, opt_b, _ = restore_latest(tmp_path / 'b', cfg)
  assert np.abs(state_a['blocks'][0]['ffn']['b_select_E'][...]).max() > 0
  for x, y in zip(jax.tree.leaves((state_a, opt_a)), jax.tree.leaves((state_b, opt_b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
