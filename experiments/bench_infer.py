"""Inference cost, measured: prefill and decode speed against batch size and context, dense vs MoE, with memory.

  python experiments/bench_infer.py                       # the three models below, table + decode.png
  python experiments/bench_infer.py --peer                # also transformers, static cache: ratio per round
  python experiments/bench_infer.py --batches=1,16,256 --contexts=64 --json
  python experiments/bench_infer.py --quick               # toy shapes, seconds (the test)

Models (the peer's shapes, ../shared/tools/peer_hf.py: vocab 256, d_model 256, 4 layers, 4 heads, float32):
`llama` dense FFN 1024; `mixtral-512` 8 experts of 512, top-2 (the same active parameters); `llama-4096` dense
FFN 4096 (the MoE's total parameters). Timing and memory: slmjax/decode_cost.py (greedy decode of
--new_tokens after a random prompt of each context; points with batch x context > --max_prefill_tokens are
skipped). The crossover is the batch where the MoE's decode tokens/s line crosses each dense line, interpolated
between measured batches. On this shared 2-core CPU compare ratios, not absolute figures.
"""

from __future__ import annotations

from slmjax import hugepages

hugepages.reexec()  # first: XLA:CPU steps page-fault far less with huge pages (slmjax/hugepages.py)

import json
import os
import pathlib
import statistics
import subprocess

from absl import flags

from slmjax import atomic, cli, decode_cost, plots
from slmjax.config import ModelConfig

COMMON = dict(vocab_size=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=1024,
              tie_embeddings=False, norm_eps=1e-6)
MOE = dict(n_experts=8, top_k=2, capacity_factor=None)
MODELS = {'llama': dict(COMMON, d_ff=1024), 'mixtral-512': dict(COMMON, d_expert=512, **MOE),
          'llama-4096': dict(COMMON, d_ff=4096)}
QUICK_COMMON = dict(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
QUICK = {'llama': dict(QUICK_COMMON, d_ff=64), 'mixtral-512': dict(QUICK_COMMON, d_expert=32, **MOE),
         'llama-4096': dict(QUICK_COMMON, d_ff=128)}
PEER_SCRIPT = pathlib.Path(__file__).resolve().parent / 'peer_hf_decode.py'
PEER_SETUP = ('python3 -m venv ~/.hfpeer && ~/.hfpeer/bin/pip install torch==2.13.0 transformers==5.23.0 '
              'safetensors')

flags.DEFINE_list('batches', ['1', '4', '16', '64', '256'], 'Batch sizes (sequences decoded together).')
flags.DEFINE_list('contexts', ['64', '512'], 'Prompt lengths (tokens per sequence before decoding).')
flags.DEFINE_integer('new_tokens', 8, 'Tokens decoded per sequence after the prompt.')
flags.DEFINE_integer('repeats', 2, 'Timed rounds per point (after one that compiles); the median is kept.')
flags.DEFINE_integer('max_prefill_tokens', 16384, 'Skip points whose prompt tokens, batch x context, exceed this '
                     '(0: none).')
flags.DEFINE_boolean('quick', False, 'Toy shapes (d_model 32, one layer), batches 1,4, context 8, 4 new tokens.')
flags.DEFINE_string('out', '.', 'Directory for decode.png and decode_rows.json (the rows, and the peer\'s).')
flags.DEFINE_boolean('json', False, 'Print one JSON list of rows instead of a table.')
flags.DEFINE_boolean('peer', False, 'Also time experiments/peer_hf_decode.py (peer venv), its rounds alternating '
                     'with slmjax\'s (at least 3 a point); print slmjax / peer per round and the median.')
flags.DEFINE_string('peer_python', os.path.expanduser('~/.hfpeer/bin/python'), "The peer venv's python.")
flags.DEFINE_integer('peer_threads', 1, 'torch threads of the peer (1: its fastest on this shared 2-core CPU, '
                     'peer_hf_decode.py).')
FLAGS = flags.FLAGS


class Peer:
  """experiments/peer_hf_decode.py --serve in the peer venv, a process of its own: one round of a point a call."""

  def __init__(self, python: str, threads: int):
    self.proc = subprocess.Popen([python, str(PEER_SCRIPT), '--serve', '--threads', str(threads)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.versions = self._answer()

  def _answer(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise ValueError(f'--peer: {PEER_SCRIPT.name} exited with status {self.proc.wait()} (its stderr is above)')
    answer = json.loads(line)
    if 'error' in answer:
      raise ValueError(f'--peer: {PEER_SCRIPT.name}: {answer["error"]}')
    return answer

  def round(self, model: str, batch: int, context: int, new_tokens: int) -> dict:
    """{'prefill_s', 'decode_s'} of one peer round at this point."""
    self.proc.stdin.write(json.dumps(dict(model=model, batch=batch, context=context, new_tokens=new_tokens)) + '\n')
    self.proc.stdin.flush()
    return self._answer()

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def add_peer(rows: list[dict], versions: dict) -> list[dict]:
  """Moves each row's interleaved peer rounds into peer fields: the peer's median tokens/s and the ratio slmjax /
  peer of every round (the two timed back to back) and its median. Returns the peer's rows (for the plot)."""
  peers = []
  for r in rows:
    rounds = r.pop('interleaved')
    made = r['batch'] * r['new_tokens']
    ratios = [made / ours / (made / theirs['decode_s']) for ours, theirs in zip(r['decode_s_rounds'], rounds)]
    peer = {'model': r['model'], 'batch': r['batch'], 'context': r['context'], **versions,
            'decode_s_rounds': [p['decode_s'] for p in rounds], 'prefill_s_rounds': [p['prefill_s'] for p in rounds],
            'decode_tokens_per_s': statistics.median(made / p['decode_s'] for p in rounds),
            'prefill_tokens_per_s': statistics.median(r['batch'] * r['context'] / p['prefill_s'] for p in rounds)}
    r.update(peer_decode_tokens_per_s=peer['decode_tokens_per_s'], peer_ratio_rounds=ratios,
             peer_prefill_tokens_per_s=peer['prefill_tokens_per_s'], peer_ratio=statistics.median(ratios))
    peers.append(peer)
  return peers


def format_table(rows: list[dict]) -> str:
  peers = any('peer_ratio' in r for r in rows)
  head = (f'{"model":<12} {"B":>4} {"T":>5} {"decode tok/s":>12} {"ms/token":>9} {"prefill tok/s":>13} '
          f'{"weights MB":>10} {"(computed)":>10} {"KV MB":>8} {"(computed)":>10} {"decode peak MB":>14}'
          + (f' {"peer tok/s":>10} {"slmjax/peer":>11}  {"per round":<16}' if peers else ''))
  lines = [head, '-' * len(head)]
  for r in rows:
    line = (f'{r["model"]:<12} {r["batch"]:>4} {r["context"]:>5} {r["decode_tokens_per_s"]:>12,.0f} '
            f'{r["decode_ms_per_token"]:>9.2f} {r["prefill_tokens_per_s"]:>13,.0f} {r["weight_bytes"] / 1e6:>10.2f} '
            f'{r["weight_bytes_computed"] / 1e6:>10.2f} {r["kv_cache_bytes"] / 1e6:>8.2f} '
            f'{r["kv_cache_bytes_computed"] / 1e6:>10.2f} {(r["decode_peak_bytes"] or 0) / 1e6:>14.2f}')
    if 'peer_ratio' in r:
      line += (f' {r["peer_decode_tokens_per_s"]:>10,.0f} {r["peer_ratio"]:>11.2f}  '
               + ' '.join(f'{x:.2f}' for x in r['peer_ratio_rounds']))
    lines.append(line)
  return '\n'.join(lines)


def format_crossovers(rows: list[dict]) -> str:
  lines = []
  for dense in ('llama', 'llama-4096'):
    for c in decode_cost.crossovers(rows, 'mixtral-512', dense):
      ratios = ', '.join(f'B={b}: {v:.2f}' for b, v in c['ratio_by_batch'].items())
      if c['batch'] is not None:
        where = f'crosses at batch ~{c["batch"]:.1f}'
      else:
        where = f'does not cross (MoE {"faster" if c["moe_faster_at_smallest"] else "slower"} at every batch)'
      lines.append(f'mixtral-512 vs {dense}, context {c["context"]}: {where}; MoE / dense tokens/s {ratios}')
  return '\n'.join(lines)


def main(argv):
  del argv
  batches, contexts = cli.positive_ints('batches'), cli.positive_ints('contexts')
  new_tokens, shapes = FLAGS.new_tokens, MODELS
  if FLAGS.quick:
    batches, contexts, new_tokens, shapes = [1, 4], [8], 4, QUICK
  if new_tokens < 1 or FLAGS.repeats < 1:
    raise ValueError(f'--new_tokens and --repeats must be >= 1, got {new_tokens} and {FLAGS.repeats}')
  if FLAGS.peer and FLAGS.quick:
    raise ValueError('--peer runs the peer\'s shapes; drop --quick to compare against it')
  if FLAGS.peer and not pathlib.Path(FLAGS.peer_python).exists():
    raise ValueError(f'--peer: no peer python at {FLAGS.peer_python}; create the venv with `{PEER_SETUP}` '
                     '(../shared/tools/README.md), or give --peer_python')
  models = {name: ModelConfig(**shape) for name, shape in shapes.items()}
  for name, cfg in models.items():
    if max(contexts) + new_tokens > cfg.max_seq_len:
      raise ValueError(f'--contexts up to {max(contexts)} + --new_tokens={new_tokens} exceed {name}\'s max_seq_len='
                       f'{cfg.max_seq_len}; use shorter contexts')
  if os.path.exists(FLAGS.out) and not os.path.isdir(FLAGS.out):
    raise ValueError(f'--out={FLAGS.out} is a file; give a directory for decode.png and decode_rows.json')
  log = None if FLAGS.json else (lambda line: print(f'# {line}', flush=True))
  peer, peers = Peer(FLAGS.peer_python, FLAGS.peer_threads) if FLAGS.peer else None, None
  try:  # with the peer: rounds of slmjax and of the peer alternate, at least 3 of each a point
    rows = decode_cost.sweep(models, batches, contexts, new_tokens, max(FLAGS.repeats, 3) if peer else FLAGS.repeats,
                             FLAGS.max_prefill_tokens, log, interleave=peer and peer.round)
  finally:
    if peer:
      peer.close()
  if not rows:
    raise ValueError(f'every point was skipped (--max_prefill_tokens={FLAGS.max_prefill_tokens} is below the '
                     'smallest batch x context); raise it')
  if peer:
    peers = add_peer(rows, peer.versions)
  os.makedirs(FLAGS.out, exist_ok=True)
  path = plots.plot_decode(rows, os.path.join(FLAGS.out, 'decode.png'), peers)
  atomic.write_json(os.path.join(FLAGS.out, 'decode_rows.json'), {'rows': rows, 'peer_rows': peers})
  if FLAGS.json:
    print(json.dumps(rows))
    return
  print(format_table(rows))
  print(format_crossovers(rows))
  print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
