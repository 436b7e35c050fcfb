"""Generate text with a KV cache: from a trained run's checkpoint, or from a model with random weights.

  python experiments/sample.py --out=runs/<run_id> --prompt='def main(' --max_new_tokens=200
  python experiments/sample.py --out=runs/<run_id> --temperature=0            # greedy
  python experiments/sample.py --out=runs/<run_id> --top_k_tokens=40 --top_p=0.9 --samples=3 --sample_seed=1
  python experiments/sample.py --preset=deepseek-v3 --scale_down              # random weights: the machinery

Tokens are bytes (slmjax.data.ByteTokenizer), as in training; the prompt plus --max_new_tokens must fit in the
model's max_seq_len (a run's training --seq_len). The same seed, prompt and checkpoint give the same text.
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

from slmjax import cli, data, generate, trained
from slmjax.model import create_model

flags.DEFINE_string('out', None, 'A trained run directory (runs/<run_id>) to sample from; without it, the model '
                    'the model flags / --preset describe, with random weights.')
flags.DEFINE_string('prompt', 'def ', 'Text to continue (UTF-8 bytes are the tokens).')
flags.DEFINE_integer('samples', 1, 'Continuations of the prompt, generated as one batch.')
cli.define_model_flags()
cli.define_sampling_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  sampling = cli.sampling_config_from_flags()
  if FLAGS.out:
    model, step = trained.load_model(FLAGS.out)
    source = f'{FLAGS.out} (step {step})'
  else:
    model, source = create_model(cli.model_config_from_flags()), 'random weights'
  tokenizer = data.ByteTokenizer()
  if model.cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'the model has vocab_size={model.cfg.vocab_size}: too small for byte tokens (256)')
  prompt_T = tokenizer.encode(FLAGS.prompt)
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


if __name__ == '__main__':
  cli.run(main)
