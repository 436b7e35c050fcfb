"""Redraw the scaling and cost plots, the table and the fits from finished sweeps (no training).

  python experiments/plot.py --results=runs
  python experiments/plot.py --results=runs_dense,runs_moe --out=figures
"""

from __future__ import annotations

import os

from absl import flags

from slmjax import cli, report, results

flags.DEFINE_list('results', ['runs'], 'Directories holding results.jsonl (comma-separated).')
flags.DEFINE_string('out', None, 'Where to write the PNGs; default the first --results directory.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  rows = results.read_many(FLAGS.results)
  out = FLAGS.out or FLAGS.results[0]
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out={out} is a file; give a directory for the figures')
  os.makedirs(out, exist_ok=True)
  report.summarize(rows, out)


if __name__ == '__main__':
  cli.run(main)
