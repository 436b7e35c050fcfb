"""Build the reference fixtures of tests/test_convert.py with `transformers` (needs torch; slmjax does not):

  ~/.hfpeer/bin/python tests/scripts/make_hf_fixtures.py --family=llama      # or --family=all

For each family of tests/scripts/hf_families.py: a tiny model from its config (fp32, fixed seed; every weight
redrawn so that norms and biases are not their trivial init), saved with save_pretrained into
tests/fixtures/hf/<family>/, plus tokens.npy (int32 [2, SEQ_LEN]) and logits.npy (transformers' float32 forward
on them) and reference.json (the versions that made them). Rerunnable: the same versions give the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from hf_families import FAMILIES, SEED, SEQ_LEN  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent.parent / 'fixtures' / 'hf'


def build(name: str):
  """(model, tokens_BT) of family `name`: the transformers model with redrawn weights and the test tokens."""
  model_type, overrides = FAMILIES[name]
  config = transformers.AutoConfig.for_model(model_type, **overrides)
  config._attn_implementation = 'eager'  # the plain reference arithmetic (and Gemma 2's soft-capping)
  torch.manual_seed(SEED)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1:  # norm gains (ones, or zeros for Gemma's 1 + w) and biases: perturbed around their init
        p.add_(0.2 * torch.randn_like(p))
      else:  # matrices: unit-variance outputs, so logits are O(1) and every path shows in them
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    for bname, b in model.named_buffers():
      if bname.endswith('e_score_correction_bias'):  # DeepSeek-V3's selection bias: a buffer, zeros at init
        b.copy_(0.2 * torch.randn_like(b))
  tokens_BT = np.random.default_rng(SEED).integers(0, config.vocab_size, (2, SEQ_LEN)).astype(np.int32)
  return model, tokens_BT


def logits_of(model, tokens_BT: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens_BT.astype(np.int64))).logits.float().numpy()


def save(name: str, out: pathlib.Path) -> pathlib.Path:
  """Write family `name`'s fixture into `out` (created); returns it."""
  model, tokens_BT = build(name)
  out.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(out)
  (out / 'generation_config.json').unlink(missing_ok=True)
  np.save(out / 'tokens.npy', tokens_BT)
  np.save(out / 'logits.npy', logits_of(model, tokens_BT))
  (out / 'reference.json').write_text(json.dumps(
      {'family': name, 'transformers': transformers.__version__, 'torch': torch.__version__, 'seed': SEED},
      indent=2) + '\n')
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--family', required=True, help=f'one of {", ".join(FAMILIES)}, or all')
  parser.add_argument('--out', default=str(FIXTURES), help='parent directory of the fixtures')
  args = parser.parse_args()
  names = list(FAMILIES) if args.family == 'all' else [args.family]
  for name in names:
    if name not in FAMILIES:
      parser.error(f'--family={name}: not one of {", ".join(FAMILIES)} (add it to tests/scripts/hf_families.py)')
    path = save(name, pathlib.Path(args.out) / name)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f'{name}: {path} ({size / 1024:.0f} KB)')


if __name__ == '__main__':
  main()
