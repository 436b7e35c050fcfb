"""Results rows: one JSON object per finished run in `<out>/results.jsonl`, appended atomically.

Appending rewrites the whole file through a temporary file and `os.replace`, so a kill at any moment leaves either
the old file or the new one, never a half-written line. Rows carry a `run_id`; appending a run_id that is already
there is refused, so a rerun can never duplicate a point. `group_rows` orders rows by architecture for tables and
plots.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib

from slmjax import atomic

RESULTS_FILE = 'results.jsonl'


def read_rows(out_dir: str | os.PathLike) -> list[dict]:
  """All rows of `<out_dir>/results.jsonl` ([] when there is none); a corrupt line is an error naming the file."""
  path = pathlib.Path(out_dir) / RESULTS_FILE
  if not path.exists():
    return []
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number} is not valid JSON ({e.msg}); fix or remove that line') from None
  return rows


def read_many(out_dirs: list[str]) -> list[dict]:
  """Rows of several result directories together (to compare sweeps run into different --out)."""
  rows = []
  for out_dir in out_dirs:
    if not (pathlib.Path(out_dir) / RESULTS_FILE).exists():
      raise ValueError(f'{out_dir} holds no {RESULTS_FILE}; pass a directory a sweep wrote')
    rows += read_rows(out_dir)
  return rows


def append_row(out_dir: str | os.PathLike, row: dict) -> None:
  """Add one finished run's row; refuses a row whose run_id is already present."""
  path = pathlib.Path(out_dir) / RESULTS_FILE
  rows = read_rows(out_dir)
  if any(r.get('run_id') == row['run_id'] for r in rows):
    raise ValueError(f'run {row["run_id"]} already has a row in {path}')
  atomic.write_text(path, ''.join(json.dumps(r, sort_keys=True) + '\n' for r in rows + [row]))


def arch_label(row: dict) -> str:
  if row.get('arch') == 'dense' or not row.get('n_experts'):
    return 'dense'
  return f'moe E={row["n_experts"]} k={row["top_k"]}'


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
  """Rows by architecture label, dense first, each sorted by total parameters."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[arch_label(row)].append(row)
  order = sorted(groups, key=lambda label: (label != 'dense', label))
  return {label: sorted(groups[label], key=lambda r: r['total_params']) for label in order}
