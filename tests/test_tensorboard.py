"""TensorBoard event files: the metrics rows of a run, read back from the files tensorboardX wrote."""

import pathlib
import struct

from tensorboardX.proto import event_pb2

from slmjax import ModelConfig
from slmjax.config import TrainConfig
from slmjax.tensorboard import TensorBoardLog
from slmjax.train import train


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of every event file below `directory` (TFRecord: length, crc, data, crc)."""
  scalars = {}
  for path in sorted(pathlib.Path(directory).rglob('events.out.tfevents.*')):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
      if event.session_log.status == event_pb2.SessionLog.START:
        scalars.setdefault('session_start', []).append((event.step, 0.0))
  return scalars


def test_rows_become_scalars_and_resume_purges_later_steps(tmp_path):
  log = TensorBoardLog(tmp_path, start_step=0)
  for step in (1, 2, 3):
    log.write({'step': step, 'train_loss': 5.0 - step, 'lr': 0.1, 'not_a_metric': 7})
  log.close()
  scalars = read_scalars(tmp_path)
  assert scalars['train/loss'] == [(1, 4.0), (2, 3.0), (3, 2.0)] and 'not_a_metric' not in str(scalars)
  TensorBoardLog(tmp_path, start_step=2).close()  # resumed from step 2: TensorBoard drops the steps after it
  assert read_scalars(tmp_path)['session_start'] == [(2, 0.0)]


def test_a_training_run_writes_its_losses_router_stats_and_throughput(tmp_path, monkeypatch):
  monkeypatch.setenv('SLMJAX_CACHE_DIR', str(tmp_path / 'cache'))
  cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=32, n_experts=4, top_k=2)
  summary = train(cfg, TrainConfig(steps=6, batch_size=4, seq_len=32, warmup=1, eval_every=3, eval_batches=1,
                                   log_every=2, checkpoint_every=0), tmp_path / 'run', log=None, tensorboard=True)
  scalars = read_scalars(tmp_path / 'run' / 'tensorboard')
  assert [step for step, _ in scalars["train/loss"]] == [2, 3, 4, 6]  # every logged row: 3 is an eval
  assert [step for step, _ in scalars['eval/loss']] == [0, 3, 6]
  assert scalars['eval/loss'][-1][1] == float(__import__('numpy').float32(summary['eval_loss']))
  for tag in ('optim/lr', 'optim/grad_norm', 'router/drop_fraction', 'router/lb_loss', 'router/entropy',
              'router/expert_load_max_over_mean', 'speed/tokens_per_s'):
    assert tag in scalars, tag
