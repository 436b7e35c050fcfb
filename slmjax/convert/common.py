"""What every family module shares: tensor layout rules between a checkpoint and slmjax parameters, the
state built from them (checked against the model's own tree), and the config fields many families spell alike.

A `Rule` pairs one checkpoint tensor with one slmjax parameter: a torch `nn.Linear` weight is [out, in] and
slmjax stores [in..., out...] (`linear`), everything else only reshapes (`plain`); `stacked` pairs one tensor
per expert with one slmjax parameter whose leading axis is E. Every way is exact (transposes, reshapes,
stacking), so an exported tensor equals the imported one bit for bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from slmjax.config import ModelConfig, yarn_mscale
from slmjax.model import abstract_model

# Checkpoint tensors that carry no parameter (buffers some exporters save).
IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


class Rule(NamedTuple):
  """Checkpoint tensor `hf` of shape `hf_shape` <-> slmjax parameter `path` ('blocks.0.attn.w_q_DHZ') of shape
  `shape`; `transpose`: a torch Linear weight, [out, in] there and [in..., out...] here. With a tuple of
  names `hf` (`stacked`), each tensor has `hf_shape` and is row e of the parameter (`shape` = (E, ...))."""
  hf: str | tuple[str, ...]
  path: str
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  transpose: bool

  @property
  def names(self) -> tuple[str, ...]:
    return self.hf if isinstance(self.hf, tuple) else (self.hf,)

  def one_to_slmjax(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return w.T.reshape(shape) if self.transpose else w.reshape(shape)

  def one_to_hf(self, w: np.ndarray) -> np.ndarray:
    w = w.reshape(self.hf_shape[::-1]).T if self.transpose else w.reshape(self.hf_shape)
    return np.ascontiguousarray(w)

  def read(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The slmjax value from the checkpoint tensors (checked by `take`)."""
    if isinstance(self.hf, str):
      return self.one_to_slmjax(take(tensors, self.hf, self.hf_shape), self.shape)
    return np.stack([self.one_to_slmjax(take(tensors, n, self.hf_shape), self.shape[1:]) for n in self.hf])

  def write(self, value: np.ndarray) -> dict[str, np.ndarray]:
    """{checkpoint name: tensor} of one slmjax value."""
    if isinstance(self.hf, str):
      return {self.hf: self.one_to_hf(value)}
    return {n: self.one_to_hf(row) for n, row in zip(self.hf, value, strict=True)}


def linear(hf: str, path: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
  """A torch Linear weight [prod(out), prod(in)] <-> slmjax [*in_shape, *out_shape]."""
  return Rule(hf, path, (math.prod(out_shape), math.prod(in_shape)), (*in_shape, *out_shape), True)


def plain(hf: str, path: str, shape: tuple[int, ...], hf_shape: tuple[int, ...] | None = None) -> Rule:
  """A tensor stored alike but for its shape (embeddings, norm gains, biases: [H * Z] <-> [H, Z])."""
  return Rule(hf, path, hf_shape or shape, shape, False)


def stacked(names: list[str], path: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
            transpose: bool = True) -> Rule:
  """One tensor per expert (Linear weights [prod(out), prod(in)] when `transpose`, else of shape in_shape +
  out_shape) <-> slmjax [E, *in_shape, *out_shape], E = len(names)."""
  hf_shape = (math.prod(out_shape), math.prod(in_shape)) if transpose else (*in_shape, *out_shape)
  return Rule(tuple(names), path, hf_shape, (len(names), *in_shape, *out_shape), transpose)


def take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
  """tensors[name], checked to have `shape`; one-line ValueError naming the tensor otherwise."""
  if name not in tensors:
    raise ValueError(f'the checkpoint has no tensor {name} (expected shape {tuple(shape)} from its config.json)')
  if tuple(tensors[name].shape) != tuple(shape):
    raise ValueError(f'tensor {name} has shape {tuple(tensors[name].shape)}, but its config.json implies '
                     f'{tuple(shape)}')
  return tensors[name]


def path_name(path: tuple) -> str:
  return '.'.join(map(str, path))


def build_state(cfg: ModelConfig, params: dict[str, np.ndarray]) -> nnx.State:
  """The model state of `cfg` holding `params` ({path: array}, one per variable of the model tree, cast to
  its dtype); ValueError when a family's rules miss or add a variable (a bug in the family module)."""
  _, state = nnx.split(abstract_model(cfg))
  params = dict(params)
  leaves = []
  for path, variable in nnx.to_flat_state(state):
    name = path_name(path)
    if name not in params:
      raise ValueError(f'no checkpoint tensor converts to the slmjax parameter {name}')
    value = params.pop(name)
    if tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f'slmjax parameter {name}: converted shape {tuple(value.shape)}, the model has '
                       f'{tuple(variable.shape)}')
    leaves.append((path, variable.replace(jnp.asarray(np.asarray(value).astype(variable.dtype)))))
  if params:
    raise ValueError(f'converted values {sorted(params)[:3]} match no slmjax parameter')
  return nnx.from_flat_state(leaves)


def flat_params(state: nnx.State) -> dict[str, np.ndarray]:
  """{path: numpy array} of every variable in a model state (the inverse of `build_state`)."""
  return {path_name(path): np.asarray(variable[...]) for path, variable in nnx.to_flat_state(state)}


def import_rules(rules: list[Rule], tensors: dict[str, np.ndarray], cfg: ModelConfig,
                 ignore: tuple[str, ...] = ()) -> nnx.State:
  """The model state the rules read from `tensors`; one-line ValueError for a missing tensor, a shape that does
  not match the config, or a tensor no rule reads (a feature the family does not convert)."""
  params = {r.path: r.read(tensors) for r in rules}
  used = {n for r in rules for n in r.names} | set(ignore)
  unused = sorted(n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES))
  if unused:
    raise ValueError(f'checkpoint tensor {unused[0]} (and {len(unused) - 1} more) is not read by the conversion: '
                     'an architecture feature its config.json does not announce')
  return build_state(cfg, params)


def export_rules(rules: list[Rule], state: nnx.State) -> dict[str, np.ndarray]:
  """{checkpoint name: array} the rules write from a model state, in the rules' order."""
  params = flat_params(state)
  return {name: w for r in rules for name, w in r.write(params[r.path]).items()}


def rope_params(hf: dict) -> dict:
  """The rotary parameters of a config.json in one dict, whichever spelling it uses: transformers 5
  `rope_parameters` or the Hub's `rope_scaling` (its `type` read as `rope_type`)."""
  params = dict(hf.get('rope_scaling') or {})
  params.update(hf.get('rope_parameters') or {})
  params.setdefault('rope_type', params.get('type', 'default'))
  return params


def rope_from_hf(hf: dict, phi_mscales: bool = False) -> dict:
  """ModelConfig rotary fields of a config.json (`rope_params`), with transformers' defaults: a pre-training
  length `original_max_position_embeddings` (top level first, as Phi-3 stores it), a yarn/longrope `factor`
  of max_position_embeddings / that, and the attention factor derived from them when not given.
  `phi_mscales`: longrope's attention factor is `short_mscale` (Phi-3.5-MoE; it must equal `long_mscale`).
  ValueError for a scaling type slmjax does not implement."""
  params = rope_params(hf)
  kind = params['rope_type']
  out = {'rope_theta': float(params.get('rope_theta', hf.get('rope_theta', 10_000.0)))}
  original = int(hf.get('original_max_position_embeddings') or params.get('original_max_position_embeddings')
                 or hf.get('max_position_embeddings', 4096))
  factor = float(params.get('factor') or hf.get('max_position_embeddings', original) / original)
  attention = params.get('attention_factor')
  if kind == 'llama3':
    out.update(rope_scaling='llama3', rope_factor=float(params['factor']),
               rope_low_freq_factor=float(params['low_freq_factor']),
               rope_high_freq_factor=float(params['high_freq_factor']),
               rope_original_max_len=original)
  elif kind == 'linear':
    out.update(rope_scaling='linear', rope_factor=float(params['factor']))
  elif kind == 'yarn':
    mscale, mscale_all_dim = params.get('mscale'), params.get('mscale_all_dim')
    if attention is None:
      attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                   else yarn_mscale(factor))
    out.update(rope_scaling='yarn', rope_factor=factor, rope_original_max_len=original,
               rope_beta_fast=float(params.get('beta_fast') or 32), rope_beta_slow=float(params.get('beta_slow') or 1),
               rope_truncate=bool(params.get('truncate', True)), rope_attention_factor=float(attention))
  elif kind == 'longrope':
    if phi_mscales:
      if params.get('short_mscale') != params.get('long_mscale'):
        raise ValueError(f'longrope with short_mscale={params.get("short_mscale")} != long_mscale='
                         f'{params.get("long_mscale")} is not implemented (one attention factor)')
      attention = params.get('short_mscale')
    if attention is None:
      attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    out.update(rope_scaling='longrope', rope_original_max_len=original, rope_attention_factor=float(attention),
               rope_short_factor=tuple(map(float, params['short_factor'])),
               rope_long_factor=tuple(map(float, params['long_factor'])))
  elif kind != 'default':
    raise ValueError(f'rope type {kind!r} is not implemented (slmjax has default, linear, llama3, yarn and '
                     'longrope)')
  if params.get('partial_rotary_factor', 1.0) != 1.0:
    raise ValueError(f'partial_rotary_factor={params["partial_rotary_factor"]} is not implemented (1.0 only)')
  return out


def rope_to_hf(cfg: ModelConfig) -> dict:
  """config.json rotary fields in both spellings (transformers 5 reads either); yarn and longrope write their
  attention factor explicitly, so transformers derives nothing."""
  params = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling == 'linear':
    params.update(rope_type='linear', factor=cfg.rope_factor)
  if cfg.rope_scaling == 'llama3':
    params.update(rope_type='llama3', factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                  high_freq_factor=cfg.rope_high_freq_factor,
                  original_max_position_embeddings=cfg.rope_original_max_len)
  if cfg.rope_scaling == 'yarn':
    params.update(rope_type='yarn', factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_len,
                  beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate,
                  attention_factor=cfg.rope_attention_factor)
    if cfg.rope_mscale_all_dim:
      params['mscale_all_dim'] = cfg.rope_mscale_all_dim
  if cfg.rope_scaling == 'longrope':
    params.update(rope_type='longrope', original_max_position_embeddings=cfg.rope_original_max_len,
                  short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor),
                  attention_factor=cfg.rope_attention_factor)
  return {'rope_theta': cfg.rope_theta, 'rope_parameters': params}


def sliding_from_hf(hf: dict, n_layers: int) -> dict:
  """sliding_window / sliding_every from `layer_types` (transformers 5); without it, from Qwen's
  `use_sliding_window` + `max_window_layers` (local from that layer on) or, with neither, from `sliding_window`
  alone (every layer local: Mistral). ValueError for a layer pattern slmjax cannot express."""
  window = hf.get('sliding_window') or 0
  if hf.get('layer_types') is not None:
    local = [t == 'sliding_attention' for t in hf['layer_types']]
  elif 'use_sliding_window' in hf:
    local = [bool(hf['use_sliding_window']) and i >= (hf.get('max_window_layers') or 0) for i in range(n_layers)]
  else:
    local = [True] * n_layers
  if not window or not any(local):
    return {}
  types = hf.get('layer_types') or ['sliding_attention' if x else 'full_attention' for x in local]
  for every in (1, 2):
    if local == [i % every == 0 for i in range(n_layers)]:
      return {'sliding_window': int(window), 'sliding_every': every}
  raise ValueError(f'layer_types {types} is not a pattern slmjax expresses (all local, or local on even layers)')


def sliding_to_hf(cfg: ModelConfig) -> dict:
  if not cfg.sliding_window:
    return {'sliding_window': None, 'layer_types': ['full_attention'] * cfg.n_layers}
  return {'sliding_window': cfg.sliding_window,
          'layer_types': ['sliding_attention' if cfg.window(i) else 'full_attention' for i in range(cfg.n_layers)]}


def require(cfg: ModelConfig, family: str, **expected) -> None:
  """ValueError unless each named ModelConfig field has the expected value (what the family can express)."""
  for name, value in expected.items():
    if getattr(cfg, name) != value:
      raise ValueError(f'{family} checkpoints cannot express {name}={getattr(cfg, name)!r} (needs {value!r})')
