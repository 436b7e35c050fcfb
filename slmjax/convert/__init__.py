"""Hugging Face checkpoints in and out: `from_hf(directory)` reads a model directory (config.json +
safetensors) into a ModelConfig and model state, `to_hf(cfg, state, directory)` writes one back, tensor for
tensor as transformers names and lays them out. The library reads the files with numpy; it never needs torch.

  cfg, state = from_hf('SmolLM2-135M')          # or: model = load_hf('SmolLM2-135M')
  to_hf(cfg, state, 'out/smollm2')

How to add a family (one module here, one entry in FAMILIES, one fixture, one parity test):
1. `slmjax/convert/<family>.py` with `MODEL_TYPES` (the config.json `model_type`s it reads),
   `model_type_of(cfg) -> str | None` (the model_type `to_hf` writes for `cfg` when none is given; None: not
   this family's), `config_from_hf(hf: dict) -> ModelConfig`, `config_to_hf(cfg, model_type=None) -> dict`,
   `state_from_hf(tensors, cfg) -> nnx.State`, `state_to_hf(state, cfg) -> {name: array}`. Most families list
   `common.Rule`s (`linear` for a torch [out, in] weight, `plain` otherwise, `stacked` for one tensor per
   expert into an [E, ...] parameter) and call `common.import_rules` /
   `export_rules`, which check every tensor's name and shape and that none is left unread; `llama.attention_rules`
   covers a GQA attention. A feature the model lacks goes into slmjax/config.py + layers/model (off by default).
2. Add the module to FAMILIES below.
3. Add a tiny config to tests/scripts/hf_families.py, run
   `~/.hfpeer/bin/python tests/scripts/make_hf_fixtures.py --family=<name>` (any python with torch and
   transformers), and a parametrised case using tests/hf_parity.py (logits within 1e-4 of transformers', export
   bit for bit, counts equal slmjax.counting).
"""

from __future__ import annotations

import os
from types import ModuleType

from flax import nnx

from slmjax.config import ModelConfig
from slmjax.convert import deepseek, gemma2, hf_io, llama, mixtral, olmoe, phimoe, qwen_moe
from slmjax.model import Transformer, abstract_model

FAMILY_MODULES: tuple[ModuleType, ...] = (llama, gemma2, mixtral, qwen_moe, olmoe, phimoe, deepseek)
FAMILIES: dict[str, ModuleType] = {t: m for m in FAMILY_MODULES for t in m.MODEL_TYPES}


def family(model_type: str | None) -> ModuleType:
  """The module that converts `model_type`; one-line ValueError listing the known ones."""
  if model_type not in FAMILIES:
    raise ValueError(f'model_type {model_type!r} is not supported; known: {", ".join(sorted(FAMILIES))}')
  return FAMILIES[model_type]


def config_from_hf(hf: dict) -> ModelConfig:
  """The ModelConfig of a config.json dict (multimodal wrappers' `text_config` is not read); quantized
  checkpoints (a `quantization_config`, e.g. DeepSeek-V3's fp8 blocks) are refused in one line."""
  quantization = hf.get('quantization_config')
  if quantization:
    raise ValueError(f'quantized checkpoints ({quantization.get("quant_method", "?")}) are not read: convert it to '
                     'bfloat16 first (DeepSeek-V3: its inference/fp8_cast_bf16.py) and drop quantization_config')
  return family(hf.get('model_type')).config_from_hf(hf)


def from_hf(directory: str | os.PathLike) -> tuple[ModelConfig, nnx.State]:
  """(ModelConfig, model state) of a Hugging Face model directory; parameters keep the checkpoint's float
  dtype (param_dtype), computation is float32 (cfg.dtype)."""
  hf, tensors = hf_io.read_model_dir(directory)
  cfg = config_from_hf(hf)
  dtypes = {t.dtype.name for t in tensors.values()}
  if len(dtypes) == 1 and dtypes <= {'float32', 'bfloat16', 'float16'}:
    cfg = cfg.replace(param_dtype=dtypes.pop())
  return cfg, FAMILIES[hf['model_type']].state_from_hf(tensors, cfg)


def load_hf(directory: str | os.PathLike) -> Transformer:
  """The slmjax model of a Hugging Face model directory, ready to call."""
  cfg, state = from_hf(directory)
  graph, _ = nnx.split(abstract_model(cfg))
  return nnx.merge(graph, state)


def to_hf(cfg: ModelConfig, state: nnx.State, directory: str | os.PathLike, model_type: str | None = None,
          shard_bytes: int = hf_io.SHARD_BYTES) -> dict:
  """Write `state` (of a model of `cfg`) as a Hugging Face model directory transformers loads; `model_type`
  defaults to the first family's `model_type_of(cfg)`. Returns the config.json dict."""
  if model_type is None:
    model_type = next(filter(None, (m.model_type_of(cfg) for m in FAMILY_MODULES)), None)
    if model_type is None:
      raise ValueError('no Hugging Face family expresses this model; give model_type (known: '
                       f'{", ".join(sorted(FAMILIES))})')
  module = family(model_type)
  hf = module.config_to_hf(cfg, model_type)
  hf_io.write_model_dir(directory, hf, module.state_to_hf(state, cfg), shard_bytes)
  return hf
