"""Hugging Face checkpoints to slmjax runs and back (slmjax/convert; logits parity is tested per family).

  python experiments/convert.py --from_hf=SmolLM2-135M --out=runs/smollm2     # a run directory at step 0
  python experiments/convert.py --out=runs/smollm2 --to_hf=export/smollm2     # its latest checkpoint, as HF
  python experiments/train.py --init_from=runs/smollm2 --steps=200 --out=runs/smollm2-ft   # fine-tune it

A run directory is what experiments/sample.py and train.py --init_from read. --to_hf writes config.json and
model.safetensors (sharded above 4 GB) that transformers' from_pretrained loads; the model_type is the one the
run was imported from unless --model_type says otherwise.
"""

from __future__ import annotations

import os
import shutil

from absl import flags

from slmjax import cli, convert, counting
from slmjax.convert import runs

flags.DEFINE_string('from_hf', None, 'A Hugging Face model directory (config.json + *.safetensors) to import.')
flags.DEFINE_string('to_hf', None, 'Write the run --out as a Hugging Face model directory here.')
flags.DEFINE_string('out', None, 'The run directory: written by --from_hf, read by --to_hf.')
flags.DEFINE_string('model_type', None, f'--to_hf: the model_type to write ({", ".join(sorted(convert.FAMILIES))});'
                    ' default: the one the run came from.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if bool(FLAGS.from_hf) == bool(FLAGS.to_hf) or not FLAGS.out:
    raise ValueError('give --from_hf=HF_DIR --out=RUN_DIR (import) or --out=RUN_DIR --to_hf=HF_DIR (export)')
  if FLAGS.from_hf:
    cfg, state, info = runs.read_source(FLAGS.from_hf)
    runs.write_run(cfg, state, FLAGS.out, {'hf_dir': FLAGS.from_hf, 'model_type': info['model_type']},
                   info.get('tokenizer'))
    counts = counting.analytic_counts(cfg)
    print(f'{FLAGS.from_hf} ({info["model_type"]}, {counts.total:,} parameters, {cfg.param_dtype}) -> {FLAGS.out}'
          + (' with its tokenizer.json' if info.get('tokenizer') else ''))
  else:
    cfg, state, info = runs.read_source(FLAGS.out)
    hf = convert.to_hf(cfg, state, FLAGS.to_hf, model_type=FLAGS.model_type or info.get('model_type'))
    if info.get('tokenizer'):
      shutil.copy(info['tokenizer'], os.path.join(FLAGS.to_hf, runs.TOKENIZER))
    print(f'{FLAGS.out} (step {info.get("step")}) -> {FLAGS.to_hf} ({hf["model_type"]})')


if __name__ == '__main__':
  cli.run(main)
