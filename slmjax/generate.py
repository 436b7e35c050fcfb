"""Text generation with a KV cache: one jitted prefill of the prompt, then a jitted decode loop, token by token.

The prefill runs the prompt through the model (the training forward's arithmetic) and fills every layer's cache:
rotated keys and values for MHA / GQA, the compressed key/value latent and the shared rotary key for MLA (what
DeepSeek caches). Each decode step embeds one token per sequence, attends over the cache and appends to it; the
steps run inside one `lax.scan`, so a whole continuation is one compiled program and the cache is updated in place.

MoE layers generate dropless (a capacity limit would let one sequence's tokens evict another's); the prefill uses
the layer's dropless dispatch, and a decode step `select` (slmjax/dispatch/select.py): while the step's
assignments are fewer than the experts, each gathers only its own expert's weights, so a decode step at small batch
reads k experts a token, not all E.

Sampling (`SamplingConfig`): greedy at temperature 0, else softmax(logits / temperature) restricted to the top-k
tokens and / or the top-p nucleus; step i draws with `fold_in(key(sample_seed), i)`, so a seed fixes the tokens.

Shape letters: slmjax/shapes.py (here B batch, T prompt positions, U cache slots, V vocabulary, N new tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slmjax.config import ModelConfig, SamplingConfig
from slmjax.model import Transformer, abstract_model, init_cache


def prefill_config(cfg: ModelConfig) -> ModelConfig:
  """The model as a prefill runs it: the same parameters, dropless (dispatch chosen for that)."""
  return cfg.replace(capacity_factor=None, dispatch='auto') if cfg.is_moe else cfg


def decode_config(cfg: ModelConfig) -> ModelConfig:
  """The model as a decode step runs it: dropless, and MoE layers gather only the chosen experts' weights."""
  return cfg.replace(capacity_factor=None, dispatch='select') if cfg.is_moe else cfg


def sample_tokens(logits_BV: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """One token per row of logits: the argmax at temperature 0, else a draw from softmax(logits / temperature)
  over the `top_k_tokens` most likely tokens (0: all) and the smallest set of them whose probability reaches
  `top_p` (1: all). Returns int32 tokens_B."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  lowest = jnp.finfo(jnp.float32).min
  if sampling.top_k_tokens and sampling.top_k_tokens < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k_tokens)[0][:, -1:]
    logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, lowest)
  if sampling.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the tokens more likely than this one
    kept_B = jnp.maximum(jnp.sum(before_BV < sampling.top_p, axis=-1), 1)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, kept_B[:, None] - 1, axis=-1)
    logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, lowest)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def check_request(cfg: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int,
                  length: int | None = None) -> None:
  """One-line ValueErrors for a generation that cannot run: no sequences, no prompt, or a prompt + new tokens
  longer than the cache of `length` positions (default: the model's max_seq_len, the longest cache)."""
  check_batch(batch)
  if prompt_len < 1:
    raise ValueError('the prompt is empty: give at least one token to continue')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  length = cfg.max_seq_len if length is None else length
  if prompt_len + max_new_tokens > length:
    limit = (f"the model's max_seq_len={length}" if length == cfg.max_seq_len else
             f'the cache of {length} positions (max_seq_len={cfg.max_seq_len})')
    raise ValueError(f'a prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds {limit}; shorten the '
                     'prompt or ask for fewer new tokens')


def check_batch(batch) -> None:
  if not isinstance(batch, (int, np.integer)) or batch < 1:
    raise ValueError(f'batch must be a positive number of sequences, got {batch!r}')


class Generator:
  """Jitted prefill and decode of one model for `batch` sequences of up to `length` positions (the cache size).

    gen = Generator(model, batch=1, length=256, sampling=SamplingConfig(temperature=0))
    tokens_BN = gen.generate(prompt_BT)          # prompt + max_new_tokens must fit in `length`

  `prefill(state, prompt_BT) -> (caches, logits_BV)` and `decode(state, caches, logits_BV, start, key, steps) ->
  (tokens_BN, caches, logits_BV)` are the two compiled programs (the decode donates its caches); `state` is the
  model's nnx.State, so benchmarks can time them and read their compiled memory.
  """

  def __init__(self, model: Transformer, batch: int, length: int, sampling: SamplingConfig | None = None):
    cfg = model.cfg
    check_batch(batch)
    if not 2 <= length <= cfg.max_seq_len:
      raise ValueError(f'the cache holds prompt + new tokens: its length must be in [2, max_seq_len='
                       f'{cfg.max_seq_len}], got {length}')
    self.cfg, self.batch, self.length = cfg, batch, length
    self.sampling = sampling or SamplingConfig()
    self.state = nnx.state(model)
    prefill_graph = nnx.graphdef(abstract_model(prefill_config(cfg)))
    decode_graph = nnx.graphdef(abstract_model(decode_config(cfg)))
    self.prefill = jax.jit(functools.partial(_prefill, prefill_graph, batch, length))
    self.decode = jax.jit(functools.partial(_decode, decode_graph, self.sampling), static_argnums=(5,),
                          donate_argnums=(1,))

  def generate(self, prompt_BT, max_new_tokens: int | None = None, seed: int | None = None) -> np.ndarray:
    """`max_new_tokens` (default: the sampling config's) tokens after `prompt_BT` (int, [batch, T]), as numpy."""
    prompt_BT = np.asarray(prompt_BT, dtype=np.int32)
    steps = self.sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
    if prompt_BT.ndim != 2 or prompt_BT.shape[0] != self.batch:
      raise ValueError(f'the prompt must be [batch={self.batch}, tokens], got shape {prompt_BT.shape}')
    check_request(self.cfg, self.batch, prompt_BT.shape[1], steps, self.length)
    if prompt_BT.min() < 0 or prompt_BT.max() >= self.cfg.vocab_size:
      raise ValueError(f'prompt token ids must be in [0, {self.cfg.vocab_size}), got {prompt_BT.min()}..'
                       f'{prompt_BT.max()}')
    caches, logits_BV = self.prefill(self.state, prompt_BT)
    key = jax.random.key(self.sampling.sample_seed if seed is None else seed)
    tokens_BN, _, _ = self.decode(self.state, caches, logits_BV, jnp.int32(prompt_BT.shape[1]), key, steps)
    return np.asarray(tokens_BN)


def _prefill(graph: nnx.GraphDef, batch: int, length: int, state: nnx.State, prompt_BT: jax.Array):
  """(caches, logits_BV of the last prompt position) after running the prompt through the model."""
  model = nnx.merge(graph, state)
  logits_B1V, caches = model.cached_forward(prompt_BT, init_cache(model.cfg, batch, length), 0, last_only=True)
  return caches, logits_B1V[:, 0]


def _decode(graph: nnx.GraphDef, sampling: SamplingConfig, state: nnx.State, caches: tuple, logits_BV: jax.Array,
            start: jax.Array, key: jax.Array, steps: int):
  """`steps` decode steps from position `start`: step i samples a token from the current logits, writes it to the
  caches at start + i and computes the next logits. Returns (tokens_BN, caches, logits_BV)."""
  model = nnx.merge(graph, state)

  def step(carry, i):
    caches, logits_BV = carry
    token_B = sample_tokens(logits_BV, jax.random.fold_in(key, start + i), sampling)
    logits_B1V, caches = model.cached_forward(token_B[:, None], caches, start + i)
    return (caches, logits_B1V[:, 0]), token_B

  (caches, logits_BV), tokens_NB = jax.lax.scan(step, (caches, logits_BV), jnp.arange(steps, dtype=jnp.int32))
  return tokens_NB.T, caches, logits_BV
