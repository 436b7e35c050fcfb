"""Warmup-stable-decay runs with cooldown branches: several (N, D) points from one run (Hagele et al. 2024).

A WSD run of S steps is warmup, the peak learning rate held, then a cooldown over its last `decay_steps(S)`
steps (slmjax/optim.py). Before its cooldown a run's learning rate does not depend on S, so the runs of every
length share one *stable trunk*: the branch of length S forks from the trunk at step S - decay_steps(S) and
cools down alone. On disk, `<out>/trunk/` is the trunk (a run directory of slmjax/train.py that only ever
trains stable steps) and `<out>/branch-<S>/` each branch (an ordinary run of S steps, started from a copy of
the trunk's checkpoint at its fork). Everything resumes: the trunk from its latest checkpoint, a branch from its
own; a finished branch returns its summary. A larger `--steps` (or new `--branches`) continues the trunk from
its last stable checkpoint, never from a cooled-down end, and trains only the new branches: the schedule is
never re-stretched. A new branch whose fork lies behind the trunk starts from the trunk's newest checkpoint at
or before its fork (or from scratch) and retrains the stable steps in between: the same steps, the same batches.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Callable

import jax

from slmjax import checkpoint
from slmjax.config import ModelConfig, TrainConfig
from slmjax.train import train

TRUNK = 'trunk'


def branch_dir(out_dir: str | os.PathLike, steps: int) -> pathlib.Path:
  return pathlib.Path(out_dir) / f'branch-{steps}'


def branch_config(train_cfg: TrainConfig, steps: int) -> TrainConfig:
  """The TrainConfig of the branch of `steps` steps: an ordinary WSD run of that length."""
  return train_cfg.replace(steps=steps, branches='')


def fork_step(train_cfg: TrainConfig, steps: int) -> int:
  """Where the branch of `steps` steps leaves the stable trunk (its cooldown starts)."""
  return steps - train_cfg.decay_steps(steps)


def trained_steps(train_cfg: TrainConfig) -> int:
  """Optimizer steps a whole WSD run with its branches costs: the trunk to the last fork, plus every cooldown."""
  lengths = train_cfg.branch_steps
  return fork_step(train_cfg, lengths[-1]) + sum(train_cfg.decay_steps(s) for s in lengths)


def train_wsd(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | os.PathLike, *,
              skip: frozenset[int] = frozenset(), on_branch: Callable[[int, dict], None] | None = None,
              log: Callable[[str], None] | None = print, **train_kwargs) -> dict[int, dict]:
  """Train the trunk and every branch of `train_cfg.branch_steps` (ascending, the full --steps last) in
  `out_dir`; returns {branch steps: its summary from `train`}. Branches in `skip` (a sweep already holds their
  rows) are not trained. `on_branch(steps, summary)` runs as each branch finishes, before the trunk goes on.
  `train_kwargs` go to every `slmjax.train.train` call (the trunk's without `measure_cost`)."""
  if train_cfg.schedule != 'wsd':
    raise ValueError(f'cooldown branches need schedule=wsd, got schedule={train_cfg.schedule!r}')
  if jax.process_count() > 1:
    raise ValueError('wsd branches copy checkpoints between run directories and run in one process only; train '
                     'each branch as a plain --schedule=wsd run of its --steps instead')
  out = pathlib.Path(out_dir)
  if (out / 'config.json').exists():
    raise ValueError(f'{out} holds a run without cooldown branches (its config.json); a wsd run keeps its trunk '
                     'and branches in a directory of their own: use another --out')
  trunk_dir = out / TRUNK
  trunk_cfg = train_cfg.replace(branches='')
  trunk_kwargs = {k: v for k, v in train_kwargs.items() if k != 'measure_cost'}
  say = log or (lambda line: None)
  summaries = {}
  for steps in train_cfg.branch_steps:
    if steps in skip:
      continue
    here, fork = branch_dir(out, steps), fork_step(train_cfg, steps)
    if not here.exists():
      trunk_at = checkpoint.latest_step(trunk_dir / 'checkpoints') or 0
      if trunk_at < fork:
        say(f'wsd trunk: stable steps {trunk_at} -> {fork} (the fork of the {steps}-step branch)')
        train(model_cfg, trunk_cfg, trunk_dir, stop_at_step=fork, log=log, **trunk_kwargs)
      start = _fork(trunk_dir, here, fork)
      if start < fork:
        say(f'wsd branch {steps}: the trunk has no checkpoint at step {fork}; the branch starts from step {start} '
            f'and retrains the {fork - start} stable steps in between')
    say(f'wsd branch {steps}: cooldown {fork} -> {steps}')
    summaries[steps] = train(model_cfg, branch_config(train_cfg, steps), here, log=log, **train_kwargs)
    if on_branch:
      on_branch(steps, summaries[steps])
  return summaries


def _fork(trunk_dir: pathlib.Path, target: pathlib.Path, fork: int) -> int:
  """Create the branch directory `target` from the trunk's newest checkpoint at or before step `fork` (its
  config.json and that checkpoint, copied whole into a temporary directory that is then renamed, so an
  interruption never leaves half a branch); returns that step, 0 (nothing created) when there is none."""
  steps = [s for s in checkpoint.finished_steps(trunk_dir / 'checkpoints') if s <= fork]
  if not steps:
    return 0
  start = max(steps)
  staging = target.with_name(f'.{target.name}.forking')
  shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted fork
  (staging / 'checkpoints').mkdir(parents=True)
  shutil.copy2(trunk_dir / 'config.json', staging / 'config.json')  # train() checks the branch against it
  shutil.copytree(trunk_dir / 'checkpoints' / str(start), staging / 'checkpoints' / str(start))
  os.replace(staging, target)
  return start

