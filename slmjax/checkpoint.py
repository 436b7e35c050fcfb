"""Checkpoints of a training run with orbax: model parameters, optimizer state, step and data-iterator state.

Each save is one orbax step directory, written under a temporary name and renamed when complete, so a run killed
at any moment (even `kill -9` during a save) leaves only whole checkpoints; leftovers are cleaned on the next start.
Saves are synchronous: when `save` returns, the checkpoint is on disk (a later NaN can never overwrite it,
because the training loop only saves after checking that every step since the last save was finite).
With several processes, orbax writes each process's shards of the arrays; the JSON items (data-iterator state,
metadata) come from the primary process, which is enough because every process's iterator is at the same index.
A checkpoint saved with parameter names from before the renames (LEGACY_NAMES) restores too: its arrays are read
without a target, renamed, and placed like the target's leaves. A checkpoint that cannot be read (a truncated or
corrupted file: disk full, a copy cut short) is moved aside to `<dir>.corrupt/` by `restore_latest`, with a
warning, and the previous one is restored instead.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

# Attribute names before the shape-letter legend (slmjax/shapes.py) -> today's: checkpoints of sweeps started
# before the renames (tests/fixtures/legacy_v1) restore through `Checkpointer.restore` all the same.
LEGACY_NAMES: dict[str, str] = {
    'w_q_DNH': 'w_q_DHZ', 'w_k_DKH': 'w_k_DKZ', 'w_v_DKH': 'w_v_DKZ', 'w_o_NHD': 'w_o_HZD',  # GQA attention
    'b_q_NH': 'b_q_HZ', 'b_k_KH': 'b_k_KZ', 'b_v_KH': 'b_v_KZ',
    'w_dq_DL': 'w_dq_DI', 'w_uq_LNQ': 'w_uq_IHO', 'w_q_DNQ': 'w_q_DHO', 'w_dkv_DC': 'w_dkv_DJ',  # MLA
    'w_uk_CNH': 'w_uk_JHZ', 'w_uv_CNU': 'w_uv_JHY', 'w_o_NUD': 'w_o_HYD',
    'scale_D': 'scale', 'bias_D': 'bias',  # Norm (of any width)
}


def finished_steps(directory: str | os.PathLike) -> list[int]:
  """The steps of the complete checkpoints in `directory`, without creating or cleaning anything."""
  return list(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest complete checkpoint in `directory` without creating or cleaning anything (None if none)."""
  return max(finished_steps(directory), default=None)


def aside_dir(directory: str | os.PathLike) -> str:
  """Where `restore_latest` moves the checkpoints of `directory` that cannot be read."""
  return f'{directory}.corrupt'


def path_key(entry) -> str:
  """One element of a pytree path as a string: dict keys, sequence indices and attribute names alike (a saved
  tree's keys are strings, a target's may be ints or attributes)."""
  for field in ('key', 'idx', 'name'):
    if hasattr(entry, field):
      return str(getattr(entry, field))
  return str(entry)


def flat_by_path(tree) -> dict[tuple[str, ...], Any]:
  return {tuple(map(path_key, path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def rename_legacy(saved, target):
  """`saved` (arrays restored without a target, keyed by legacy names) in the structure of `target`: each leaf
  matched by its path after LEGACY_NAMES, with the target leaf's dtype and sharding."""
  values = {tuple(LEGACY_NAMES.get(k, k) for k in path): v for path, v in flat_by_path(saved).items()}
  paths_likes, treedef = jax.tree_util.tree_flatten_with_path(target)
  leaves = []
  for path, like in paths_likes:
    name = '/'.join(map(path_key, path))
    value = values.pop(tuple(map(path_key, path)), None)
    if value is None or value.shape != like.shape:
      raise ValueError(f'legacy checkpoint: no saved array of shape {like.shape} for {name}')
    leaves.append(jax.device_put(value.astype(like.dtype), getattr(like, 'sharding', None)))
  if values:
    raise ValueError(f'legacy checkpoint: saved array {"/".join(next(iter(values)))} matches no leaf of the target')
  return jax.tree_util.tree_unflatten(treedef, leaves)


class Checkpointer:
  """Save / restore `(model state, opt_state)` pytrees plus JSON data-iterator state and metadata, by step."""

  def __init__(self, directory: str | os.PathLike, keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, model_state, opt_state, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'model': model_state, 'opt_state': opt_state}),
        data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave({**meta, 'step': step})))
    self.manager.wait_until_finished()

  def restore(self, step: int, model_state_like, opt_state_like) -> tuple[Any, Any, dict, dict]:
    """Restore into the structure, shapes, dtypes and shardings of `model_state_like` / `opt_state_like`.

    A checkpoint with legacy parameter names is restored without a target and renamed (`rename_legacy`)."""
    target = {'model': model_state_like, 'opt_state': opt_state_like}
    legacy = self.has_legacy_names(step)
    state_args = (ocp.args.StandardRestore() if legacy else
                  ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target)))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=state_args, data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    state = rename_legacy(restored['state'], target) if legacy else restored['state']
    return state['model'], state['opt_state'], restored['data'], restored['meta']

  def restore_latest(self, model_state_like, opt_state_like, warn: Callable[[str], None]
                     ) -> tuple[int, Any, Any, dict, dict] | None:
    """(step, model state, opt_state, data state, meta) of the newest checkpoint that restores; None if there is
    none. One that fails to read is moved to `<dir>.corrupt/<step>-<time>` (so later saves can reuse its step)
    with a `warn`ing, and the one before it is tried; ValueError if every checkpoint fails."""
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return (step, *self.restore(step, model_state_like, opt_state_like))
      except Exception as e:  # orbax / tensorstore raise plain Exceptions for unreadable data
        aside = aside_dir(self.directory)
        os.makedirs(aside, exist_ok=True)
        moved = os.path.join(aside, f'{step}-{time.strftime("%Y%m%dT%H%M%S")}')
        shutil.move(os.path.join(self.directory, str(step)), moved)
        self.manager.reload()
        failures.append(step)
        warn(f'warning: checkpoint step {step} in {self.directory} cannot be restored ({str(e).splitlines()[0][:160]}); '
             f'moved to {moved}, trying the previous one')
    if failures:
      raise ValueError(f'no checkpoint in {self.directory} can be restored (steps {failures}, moved to '
                       f'{aside_dir(self.directory)}); remove the run directory to start over')
    return None

  def has_legacy_names(self, step: int) -> bool:
    """Whether the saved state of `step` names any parameter by one of LEGACY_NAMES (read from its metadata)."""
    handler = ocp.StandardCheckpointHandler()
    try:
      saved = handler.metadata(epath.Path(self.directory) / str(step) / 'state')
    finally:
      handler.close()
    return any(set(path) & LEGACY_NAMES.keys() for path in flat_by_path(saved))

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
