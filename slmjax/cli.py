"""Command-line flags generated from the config dataclasses, and the error handling every script uses.

Every field of `ModelConfig` and `TrainConfig` is a flag of the same name, with the field's help text and choices
(slmjax/config.py), except the short aliases of FLAG_ALIASES (`--experts`, `--k`, `--shared_experts`). On top:
`--arch=dense|moe` (dense sets n_experts to 0), `--preset=NAME` (a published model from slmjax/presets.py; then
only the runtime fields, those marked `runtime`, may be set, plus `--seq_len`), `--scale_down`, and `--tokens`
(a token budget instead of `--steps`). Scripts call `define_model_flags()` (and `define_train_flags()`) at
import, then `model_config_from_flags()` / `train_config_from_flags()` in main.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from typing import Callable

from absl import app, flags, logging

from slmjax import presets
from slmjax.config import ModelConfig, SamplingConfig, TrainConfig, branch_steps, default_warmup

FLAGS = flags.FLAGS
FLAG_ALIASES = {'n_experts': 'experts', 'top_k': 'k', 'n_shared_experts': 'shared_experts'}
# Flag defaults that differ from the field defaults: --experts is used with --arch=moe; --max_seq_len follows
# --seq_len unless given.
MODEL_FLAG_DEFAULTS = {'n_experts': 8, 'max_seq_len': None}
RUNTIME_FLAGS = tuple(FLAG_ALIASES.get(f.name, f.name) for f in dataclasses.fields(ModelConfig)
                      if f.metadata['runtime']) + ('seq_len',)
MOE_SHAPE_FLAGS = ('experts', 'k', 'shared_experts', 'd_expert')  # an error with --arch=dense, not ignored
ARCH_FLAGS = ('arch',) + tuple(FLAG_ALIASES.get(f.name, f.name) for f in dataclasses.fields(ModelConfig)
                               if not f.metadata['runtime'])


NUMBERS = 'tuple[float, ...]'  # the annotation of a field that holds several numbers (one comma-separated flag)


def _define(field: dataclasses.Field, default, as_list: bool = False) -> None:
  name, meta = FLAG_ALIASES.get(field.name, field.name), field.metadata
  kind = field.type.replace(' | None', '')
  if as_list:  # several values, one config each (a sweep axis)
    if meta['choices'] or kind not in ('int', 'float'):
      raise TypeError(f'{field.name}: only numeric fields can be listed')
    flags.DEFINE_list(name, [str(default)], meta['help'] + ' A comma-separated list gives one config per value.')
  elif meta['choices']:
    flags.DEFINE_enum(name, default, list(meta['choices']), meta['help'])
  elif kind == NUMBERS:  # a list of numbers in one config (longrope's factors)
    flags.DEFINE_list(name, [str(v) for v in default], meta['help'])
  elif kind in ('bool', 'int', 'float', 'str'):
    define = {'bool': flags.DEFINE_boolean, 'int': flags.DEFINE_integer, 'float': flags.DEFINE_float,
              'str': flags.DEFINE_string}[kind]
    define(name, default, meta['help'])
  else:
    raise TypeError(f'{field.name}: no flag type for a field of type {field.type}')


def define_config_flags(cls, skip: tuple[str, ...] = (), defaults: dict | None = None,
                        lists: tuple[str, ...] = ()) -> None:
  """One flag per field of the config dataclass `cls` (except `skip`), defaulting to the field's default; the
  fields in `lists` take comma-separated lists (LISTED remembers them)."""
  defaults = defaults or {}
  for field in dataclasses.fields(cls):
    if field.name not in skip:
      _define(field, defaults.get(field.name, field.default), as_list=field.name in lists)
  LISTED.update(lists)


LISTED: set[str] = set()  # fields whose flag is a list (define_model_flags(lists=...))


def _listed_values(name: str, field_type: str) -> list:
  """The parsed values of a list flag; ValueError (one line) on an item that is not a number."""
  flag = FLAG_ALIASES.get(name, name)
  parse = int if field_type.startswith('int') else float
  try:
    values = [parse(v) for v in FLAGS[flag].value]
  except ValueError:
    raise ValueError(f'--{flag}={",".join(FLAGS[flag].value)}: every item must be a number') from None
  if not values:
    raise ValueError(f'--{flag} is empty: give at least one value')
  return values


def flag_values(cls, skip: tuple[str, ...] = (), only_present: bool = False) -> dict:
  """{field: value} of `cls`'s flags; a `zero_is_none` field's 0 becomes None (the one place that rule lives;
  a negative value stays, for the config's check to refuse). `only_present`: just the flags given on the command
  line."""
  values = {}
  for field in dataclasses.fields(cls):
    flag = FLAGS[FLAG_ALIASES.get(field.name, field.name)]
    if field.name in skip or (only_present and not flag.present):
      continue
    value = flag.value
    if field.name in LISTED:  # one config per value: model_configs_from_flags; here, the only value
      values_ = _listed_values(field.name, field.type)
      if len(values_) > 1:
        raise ValueError(f'--{flag.name}={",".join(flag.value)}: this needs one value (several give one config '
                         'each: model_configs_from_flags)')
      value = values_[0]
    if field.type == NUMBERS:
      try:
        value = tuple(float(v) for v in value)
      except ValueError:
        raise ValueError(f'--{flag.name}={",".join(value)}: every item must be a number') from None
    if field.metadata['zero_is_none'] and value == 0:
      value = None
    values[field.name] = value
  return values


def define_model_flags(lists: tuple[str, ...] = ()) -> None:
  """Define the architecture flags and --seq_len (idempotent, so scripts importing each other do not clash).
  `lists`: numeric fields whose flag takes several values, e.g. ('n_experts',) for sweep.py's --experts=4,8,16."""
  if 'arch' in FLAGS:
    return
  flags.DEFINE_enum('arch', 'dense', ['dense', 'moe'], 'Feed-forward type: dense FFN or routed experts.')
  define_config_flags(ModelConfig, defaults=MODEL_FLAG_DEFAULTS, lists=lists)
  _define(next(f for f in dataclasses.fields(TrainConfig) if f.name == 'seq_len'), TrainConfig.seq_len)
  flags.DEFINE_string('preset', None, f'A published architecture ({", ".join(presets.names())}); fixes the '
                      'architecture flags. count.py also takes "all".')
  flags.DEFINE_boolean('scale_down', False, 'With --preset: the same architecture at small dimensions.')


def define_train_flags() -> None:
  """Define the training flags (idempotent); --seq_len comes with define_model_flags()."""
  if 'steps' in FLAGS:
    return
  define_config_flags(TrainConfig, skip=('seq_len',))
  flags.DEFINE_integer('tokens', None, 'Token budget instead of --steps: steps = ceil(tokens / (batch * seq_len)).')
  flags.DEFINE_boolean('tensorboard', False, 'Also write TensorBoard event files into <run>/tensorboard/ '
                       '(tensorboard --logdir=<out>).')


def define_sampling_flags() -> None:
  """Define the SamplingConfig flags (idempotent): --max_new_tokens, --temperature, --top_k_tokens, --top_p,
  --sample_seed."""
  if 'temperature' not in FLAGS:
    define_config_flags(SamplingConfig)


def sampling_config_from_flags() -> SamplingConfig:
  return SamplingConfig(**flag_values(SamplingConfig))


def model_configs_from_flags() -> list[ModelConfig]:
  """One ModelConfig per combination of the list flags' values (`define_model_flags(lists=...)`), in the order
  given, duplicates dropped (--arch=dense makes every --experts the same model)."""
  listed = sorted(LISTED)
  combos = itertools.product(*(_listed_values(name, next(f.type for f in dataclasses.fields(ModelConfig)
                                                          if f.name == name)) for name in listed))
  configs = []
  for combo in combos:
    cfg = model_config_from_flags(**dict(zip(listed, combo)))
    if cfg not in configs:
      configs.append(cfg)
  return configs


def model_config_from_flags(**overrides) -> ModelConfig:
  """Build and validate the ModelConfig the flags describe (raises ValueError on nonsense); `overrides` replace
  flag values (a list flag's one value each)."""
  f = FLAGS
  if f.preset:
    return preset_config_from_flags(f.preset)
  if f.scale_down:
    raise ValueError('--scale_down needs --preset=NAME')
  values = {**flag_values(ModelConfig, skip=tuple(overrides)), **overrides}
  if f.seq_len < 1:
    raise ValueError(f'--seq_len={f.seq_len} must be positive')
  if f.arch == 'moe' and values['n_experts'] <= 0:
    raise ValueError(f'--experts={values["n_experts"]}: --arch=moe needs at least one expert (or use --arch=dense)')
  if f.arch == 'dense':
    given = [name for name in MOE_SHAPE_FLAGS if f[name].present]
    if given:
      raise ValueError(f'--{given[0]} shapes the experts of --arch=moe, and --arch is dense (the default): add '
                       f'--arch=moe, or drop --{given[0]}')
    values['n_experts'] = 0
  elif values['balance'] != 'aux_loss' and not f['router_bias'].present:
    values['router_bias'] = True  # the selection bias that balance=bias|both moves
  values['max_seq_len'] = values['max_seq_len'] or f.seq_len
  return ModelConfig(**values)


def train_fields_from_flags() -> dict:
  """The TrainConfig fields the flags give, unvalidated (`--tokens` turned into steps)."""
  f = FLAGS
  values = {**flag_values(TrainConfig, skip=('seq_len',)), 'seq_len': f.seq_len}
  if f.tokens is not None:
    if f['steps'].present:
      raise ValueError('give --steps or --tokens, not both')
    if f.tokens <= 0 or f.batch_size <= 0 or f.seq_len <= 0:
      raise ValueError(f'--tokens={f.tokens}, --batch_size={f.batch_size} and --seq_len={f.seq_len} must be positive')
    values['steps'] = math.ceil(f.tokens / (f.batch_size * f.seq_len))
  return values


def train_config_from_flags(**overrides) -> TrainConfig:
  """Build and validate the TrainConfig the flags describe (raises ValueError on nonsense).

  `overrides` replace flag values before validation. Without --warmup, a run too short for the default warmup
  gets steps // 10 (`config.default_warmup`); with schedule=wsd, its shortest cooldown branch's.
  """
  values = {**train_fields_from_flags(), **overrides}
  if not FLAGS['warmup'].present and 'warmup' not in overrides:
    shortest = (branch_steps(values['branches'], values['steps'])[0] if values['schedule'] == 'wsd'
                else values['steps'])
    values['warmup'] = default_warmup(shortest, values['warmup'])
  return TrainConfig(**values)


def given_arch_flags() -> list[str]:
  """The architecture flags (and --preset) given on the command line: what a model that comes from elsewhere (a
  run, an imported checkpoint, a fixed benchmark model) cannot take."""
  return [flag for flag in ARCH_FLAGS if FLAGS[flag].present] + (['preset'] if FLAGS.preset else [])


def positive_ints(name: str) -> list[int]:
  """The values of list flag `name`, one or more positive integers; ValueError (one line) otherwise."""
  try:
    values = [int(v) for v in FLAGS[name].value]
  except ValueError:
    given = ','.join(FLAGS[name].value)
    raise ValueError(f'--{name} must be a comma-separated list of integers, got {given}') from None
  if not values or min(values) < 1:
    raise ValueError(f'--{name} must be positive integers, got {",".join(FLAGS[name].value)}')
  return values


def reject_arch_flags(preset: str) -> None:
  """A preset fixes the architecture: an architecture flag given with it is an error, not silently ignored."""
  fixed = [flag for flag in ARCH_FLAGS if FLAGS[flag].present]
  if fixed:
    raise ValueError(f'--{fixed[0]} cannot change --preset={preset}; only --{", --".join(RUNTIME_FLAGS)} apply to '
                     'a preset')


def preset_config_from_flags(name: str) -> ModelConfig:
  """Preset `name` (scaled down with --scale_down), with the runtime flags given on the command line applied."""
  f = FLAGS
  reject_arch_flags(name)
  cfg = presets.get(name)
  if f.scale_down:
    cfg = presets.scale_down(cfg)
  return apply_runtime_flags(cfg)


def apply_runtime_flags(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with the runtime flags given on the command line (dtypes, dispatch, capacity, seq_len) applied."""
  architecture = tuple(f.name for f in dataclasses.fields(ModelConfig) if not f.metadata['runtime'])
  changes = flag_values(ModelConfig, skip=architecture, only_present=True)
  if FLAGS['seq_len'].present and not FLAGS['max_seq_len'].present:
    changes['max_seq_len'] = max(cfg.max_seq_len, FLAGS.seq_len)
  return cfg.replace(**changes)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, but a bad flag (an unknown one, a value absl cannot parse) or a ValueError becomes a
  one-line 'error: ...' on stderr and exit status 2.

  Set SLMJAX_DEBUG=1 to get the full traceback instead.
  """
  def fail(message: str) -> None:
    print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
    sys.exit(2)

  def parse(argv: list[str]) -> list[str]:
    try:
      return FLAGS(argv)
    except flags.Error as e:
      fail(' '.join(str(e).split()) + ' (--helpshort lists the flags)')

  def guarded(argv):
    if not FLAGS['verbosity'].present:  # orbax and grain log every save at INFO; keep the terminal readable
      logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
      fail(f'unexpected positional arguments {argv[1:]}; every option is a --flag')
    try:
      main(argv)
    except ValueError as e:
      if os.environ.get('SLMJAX_DEBUG'):
        raise
      fail(str(e))
  app.run(guarded, flags_parser=parse)
