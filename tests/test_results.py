"""results.jsonl with many writers: no row lost, none duplicated, a torn last line skipped and cut off."""

import json
import multiprocessing

import pytest

from slmjax import results

WRITERS, ROWS = 8, 40


def _write(args):
  out, writer = args
  for i in range(ROWS):
    results.append_row(out, {'run_id': f'w{writer}-r{i}', 'payload': 'x' * 3000})


def test_eight_processes_keep_every_row(tmp_path):
  with multiprocessing.get_context('spawn').Pool(WRITERS) as pool:
    pool.map(_write, [(str(tmp_path), w) for w in range(WRITERS)])
  rows = results.read_rows(tmp_path)
  assert len(rows) == WRITERS * ROWS and len({r['run_id'] for r in rows}) == WRITERS * ROWS
  with pytest.raises(ValueError, match='already has a row'):
    results.append_row(tmp_path, {'run_id': 'w3-r7'})


def test_a_torn_last_line_is_skipped_then_cut_off(tmp_path):
  results.append_row(tmp_path, {'run_id': 'a'})
  path = tmp_path / results.RESULTS_FILE
  with path.open('a') as f:
    f.write('{"run_id": "b", "eval_')  # a writer killed mid-line
  assert [r['run_id'] for r in results.read_rows(tmp_path)] == ['a']
  results.append_row(tmp_path, {'run_id': 'c'})
  assert [json.loads(line)['run_id'] for line in path.read_text().splitlines()] == ['a', 'c']


def test_a_corrupt_complete_line_is_an_error_naming_it(tmp_path):
  (tmp_path / results.RESULTS_FILE).write_text('{"run_id": "a"}\nnot json\n')
  with pytest.raises(ValueError, match=r'results.jsonl:2 is not valid JSON'):
    results.read_rows(tmp_path)


def test_arch_labels_keep_differently_set_moe_sweeps_apart():
  """Two MoE sweeps into one --out that differ in balancing, matching or capacity get their own curves (label);
  defaults add nothing to the label."""
  def row(**model):
    config = {'d_ff': None, 'd_expert': 64, 'capacity_factor': None, 'balance': 'aux_loss', **model}
    return {'arch': 'moe', 'n_experts': 8, 'top_k': 2, 'd_model': 32, 'model_config': config}
  labels = [results.arch_label(r) for r in (
      row(), row(balance='bias', router_bias=True), row(d_expert=16), row(capacity_factor=1.25),
      row(lb_loss_weight=0.1), {'arch': 'dense', 'n_experts': 0})]
  assert labels == ['moe E=8 k=2', 'moe E=8 k=2 balance=bias', 'moe E=8 k=2 match=total', 'moe E=8 k=2 cf=1.25',
                    'moe E=8 k=2 lb_loss_weight=0.1', 'dense']


def test_read_many_counts_each_run_once_and_refuses_what_a_sweep_did_not_write(tmp_path):
  row = {'run_id': 'a', 'arch': 'dense', 'd_model': 32, 'n_layers': 2, 'total_params': 1, 'active_params': 1,
         'eval_loss': 2.0}
  (tmp_path / 'one').mkdir()
  results.append_row(tmp_path / 'one', row)
  assert results.read_many([str(tmp_path / 'one')] * 2) == [row]  # a directory named twice counts once
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / results.RESULTS_FILE).write_text('{"foo": 1}\n')
  for dirs, message in (([], 'no results directory given'),
                        ([str(tmp_path / 'other')], 'row 1 lacks run_id, .*not a row a sweep wrote'),
                        ([str(tmp_path / 'one' / results.RESULTS_FILE)], 'is the file; pass the directory')):
    with pytest.raises(ValueError, match=message):
      results.read_many(dirs)
