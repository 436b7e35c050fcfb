"""Results rows: one JSON object per finished run in `<out>/results.jsonl`, safe for many writers.

Parallel seeds or SLURM array jobs may share one `--out`: `append_row` takes an exclusive POSIX lock
(`fcntl.lockf`) on `results.jsonl.lock`, checks the run_id is new (a rerun never duplicates a point), and appends
the row as one `write` of one line, then fsyncs. A writer killed mid-line leaves a last line without its newline:
readers skip it and the next writer cuts it off. Assumed of the file system: POSIX record locks that work across
hosts (local disks; NFSv4, or NFSv3 with lockd; Lustre mounted with `flock`; GPFS), which is also what makes
appends from several hosts safe where O_APPEND alone is not (NFS). `group_rows` orders rows by architecture for tables and
plots.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib

from slmjax.config import ModelConfig

RESULTS_FILE = 'results.jsonl'


def read_rows(out_dir: str | os.PathLike) -> list[dict]:
  """All rows of `<out_dir>/results.jsonl` ([] when there is none); a corrupt line is an error naming the file."""
  path = pathlib.Path(out_dir) / RESULTS_FILE
  if not path.exists():
    return []
  text = path.read_text()
  complete = text[:text.rfind('\n') + 1]  # a last line without its newline is being written, or was cut short
  rows = []
  for number, line in enumerate(complete.splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number} is not valid JSON ({e.msg}); fix or remove that line') from None
  return rows


# What every row a sweep writes holds, and the report reads.
ROW_KEYS = ('run_id', 'arch', 'd_model', 'n_layers', 'total_params', 'active_params', 'eval_loss')


def read_many(out_dirs: list[str]) -> list[dict]:
  """Rows of several result directories together (to compare sweeps run into different --out), each run once
  (a directory named twice, or a run copied into two, counts once); ValueError (one line) on a directory
  without results.jsonl or a row a sweep did not write."""
  if not out_dirs:
    raise ValueError('no results directory given; pass the --out of a sweep, e.g. --results=runs')
  rows = {}
  for out_dir in out_dirs:
    path = pathlib.Path(out_dir)
    if path.name == RESULTS_FILE and path.is_file():
      raise ValueError(f'{out_dir} is the file; pass the directory that holds it, {path.parent}')
    if not (path / RESULTS_FILE).exists():
      raise ValueError(f'{out_dir} holds no {RESULTS_FILE}; pass a directory a sweep wrote')
    for number, row in enumerate(read_rows(out_dir), 1):
      missing = [key for key in ROW_KEYS if key not in row]
      if missing:
        raise ValueError(f'{path / RESULTS_FILE}: row {number} lacks {", ".join(missing)}: not a row a sweep wrote')
      rows.setdefault(row['run_id'], row)
  return list(rows.values())


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  with open(path.with_name(path.name + '.lock'), 'a') as lock:
    fcntl.lockf(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.lockf(lock, fcntl.LOCK_UN)


def append_row(out_dir: str | os.PathLike, row: dict) -> None:
  """Add one finished run's row; refuses a row whose run_id is already present (safe with many writers)."""
  path = pathlib.Path(out_dir) / RESULTS_FILE
  line = (json.dumps(row, sort_keys=True) + '\n').encode()
  with _locked(path):
    if any(r.get('run_id') == row['run_id'] for r in read_rows(out_dir)):
      raise ValueError(f'run {row["run_id"]} already has a row in {path}')
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      size = os.fstat(fd).st_size
      if size and os.pread(fd, 1, size - 1) != b'\n':  # a writer died mid-line: cut its partial row off
        with open(path, 'rb') as f:
          os.ftruncate(fd, f.read().rfind(b'\n') + 1)
      os.write(fd, line)
      os.fsync(fd)
    finally:
      os.close(fd)


# Settings that make an MoE curve a different one, named in its label where they differ from the default: two
# sweeps into one --out that differ in any of them never share a curve, a fit or a paired comparison.
LABELLED_SETTINGS = ('balance', 'router', 'n_shared_experts', 'first_dense', 'moe_every', 'lb_loss_weight',
                     'z_loss_weight', 'routed_scale')
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in LABELLED_SETTINGS}


def arch_label(row: dict) -> str:
  """'dense', or 'moe E=8 k=2' (dropless, matched active), 'moe E=8 k=2 cf=1.25' (dropping), plus `match=total`
  (experts of d_ff / E) and every LABELLED_SETTINGS value off its default, e.g. 'moe E=8 k=2 balance=bias'."""
  if row.get('arch') == 'dense' or not row.get('n_experts'):
    return 'dense'
  model = row.get('model_config') or {}
  label = f'moe E={row["n_experts"]} k={row["top_k"]}'
  d_ff, d_expert = model.get('d_ff') or 4 * row['d_model'], model.get('d_expert')
  if d_expert and d_expert * row['top_k'] != d_ff:  # not matched active
    label += ' match=total' if d_expert * row['n_experts'] == d_ff else f' d_expert={d_expert}'
  if model.get('capacity_factor') is not None:
    label += f' cf={model["capacity_factor"]:g}'
  for name in LABELLED_SETTINGS:
    if name in model and model[name] != _DEFAULTS[name]:
      label += f' {name}={model[name]:g}' if isinstance(model[name], float) else f' {name}={model[name]}'
  return label


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
  """Rows by architecture label, dense first, each sorted by total parameters."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[arch_label(row)].append(row)
  order = sorted(groups, key=lambda label: (label != 'dense', label))
  return {label: sorted(groups[label], key=lambda r: r['total_params']) for label in order}
