"""Generate text with a KV cache: from a trained run's checkpoint, an imported model, or random weights.

  python experiments/sample.py --out=runs/<run_id> --prompt='def main(' --max_new_tokens=200
  python experiments/sample.py --init_from=SmolLM2-135M --prompt='Once upon a time' --max_new_tokens=40
  python experiments/sample.py --out=runs/<run_id> --temperature=0            # greedy
  python experiments/sample.py --out=runs/<run_id> --top_k_tokens=40 --top_p=0.9 --samples=3 --sample_seed=1
  python experiments/sample.py --preset=deepseek-v3 --scale_down              # random weights: the machinery

--init_from takes a Hugging Face model directory or a run directory (as train.py --init_from does). Tokens are
the model's own: its tokenizer.json when it has one (an HF directory's, a converted run's copy, or the
--tokenizer a run trained with; slmjax.data.HFTokenizer, the `tokenizers` package), else bytes
(slmjax.data.ByteTokenizer), as in training. The prompt is encoded without special tokens (no BOS). The prompt
plus --max_new_tokens must fit in the model's max_seq_len (a run's training --seq_len). The same seed, prompt
and checkpoint give the same text.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from absl import flags
from flax import nnx

from slmjax import cli, data, generate, trained
from slmjax.convert import runs
from slmjax.model import abstract_model, create_model

flags.DEFINE_string('out', None, 'A trained run directory (runs/<run_id>) to sample from; without it or '
                    '--init_from, the model the model flags / --preset describe, with random weights.')
flags.DEFINE_string('init_from', None, 'A Hugging Face model directory or a run directory to sample from, with '
                    'its tokenizer.json if it has one.')
flags.DEFINE_string('prompt', 'def ', 'Text to continue (encoded with the model\'s tokenizer, or as UTF-8 bytes).')
flags.DEFINE_integer('samples', 1, 'Continuations of the prompt, generated as one batch.')
cli.define_model_flags()
cli.define_sampling_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  sampling = cli.sampling_config_from_flags()
  if FLAGS.out and FLAGS.init_from:
    raise ValueError('give --out (a run) or --init_from (an HF directory or a run), not both')
  path = FLAGS.init_from or FLAGS.out
  if FLAGS.samples < 1:
    raise ValueError(f'--samples={FLAGS.samples}: give at least one continuation')
  fixed = cli.given_arch_flags()
  if path and fixed:
    raise ValueError(f'--{fixed[0]} cannot change the model of --{"init_from" if FLAGS.init_from else "out"}={path}: '
                     'the model comes with it (drop the model flags)')
  if FLAGS.out and not (pathlib.Path(FLAGS.out) / 'checkpoints').is_dir():
    trained.load_model(FLAGS.out)  # --out is a run: its one-line error (no run, no checkpoint)
  if path:
    cfg, state, info = runs.read_source(path)
    model = nnx.merge(nnx.graphdef(abstract_model(cfg)), state)
    source = f'{path} (step {info["step"]})' if 'step' in info else f'{path} ({info["model_type"]})'
    tokenizer_path = info.get('tokenizer') or trained_tokenizer(path)
  else:
    model, source, tokenizer_path = create_model(cli.model_config_from_flags()), 'random weights', ''
  tokenizer = data.HFTokenizer(tokenizer_path) if tokenizer_path else data.ByteTokenizer()
  if model.cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'the model has vocab_size={model.cfg.vocab_size}: too small for its tokenizer '
                     f'({tokenizer_path or "bytes"}: {tokenizer.vocab_size} tokens)')
  prompt_T = tokenizer.encode(FLAGS.prompt)
  if tokenizer_path:
    source += f', tokenizer {tokenizer_path}'
  generate.check_request(model.cfg, FLAGS.samples, len(prompt_T), sampling.max_new_tokens)
  generator = generate.Generator(model, FLAGS.samples, len(prompt_T) + sampling.max_new_tokens, sampling)
  start = time.perf_counter()
  tokens_BN = generator.generate(np.tile(prompt_T, (FLAGS.samples, 1)))
  seconds = time.perf_counter() - start
  print(f'# {source}; {sampling.max_new_tokens} new tokens x {FLAGS.samples} in {seconds:.2f} s (with compiling); '
        f'temperature {sampling.temperature}, top_k_tokens {sampling.top_k_tokens}, top_p {sampling.top_p}, '
        f'seed {sampling.sample_seed}')
  for i, tokens_N in enumerate(tokens_BN):
    print(f'--- sample {i}' if FLAGS.samples > 1 else '---')
    print(FLAGS.prompt + tokenizer.decode(tokens_N))


def trained_tokenizer(path: str) -> str:
  """The tokenizer.json a run directory's training read its data with (train.py --init_from: its --tokenizer),
  '' for byte tokens or an HF directory."""
  config = pathlib.Path(path) / 'config.json'
  saved = json.loads(config.read_text()) if (pathlib.Path(path) / 'checkpoints').is_dir() else {}
  return saved.get('train', {}).get('tokenizer') or ''


if __name__ == '__main__':
  cli.run(main)
