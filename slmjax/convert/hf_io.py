"""Hugging Face model directories on disk: `config.json` plus `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`), read into (config dict, {name: numpy array}) and written back.

Reading maps each tensor from its file (no copy until used) with numpy; bfloat16, which numpy lacks, comes as
`ml_dtypes.bfloat16` (a jax dependency), so nothing needs torch. Writing goes through `safetensors.numpy`.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

INDEX = 'model.safetensors.index.json'
DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16, 'I64': np.int64,
          'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
SHARD_BYTES = 4 << 30  # write shards of at most this many bytes (transformers' default is 5 GB)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of one .safetensors file, memory-mapped: {name: array}."""
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(n))
  header.pop('__metadata__', None)
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + n) if header else None  # one map for all tensors
  tensors = {}
  for name, info in header.items():
    if info['dtype'] not in DTYPES:
      raise ValueError(f'{path}: tensor {name} has dtype {info["dtype"]}, which slmjax cannot read')
    start, end = info['data_offsets']
    dtype, shape = np.dtype(DTYPES[info['dtype']]), tuple(info['shape'])
    if end - start != dtype.itemsize * int(np.prod(shape)) or end > data.size:
      raise ValueError(f'{path}: tensor {name} has {end - start} bytes, not those of {shape} {info["dtype"]} '
                       '(a truncated or corrupt file)')
    tensors[name] = np.asarray(data[start:end]).view(dtype).reshape(shape) if end > start else np.zeros(shape, dtype)
  return tensors


def read_model_dir(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, every tensor of the model's safetensors files); one-line ValueError when the
  directory holds no such model."""
  path = pathlib.Path(directory)
  if not (path / 'config.json').is_file():
    raise ValueError(f'{path} holds no Hugging Face model (no config.json); give the directory save_pretrained or '
                     '`hf download` wrote')
  config = json.loads((path / 'config.json').read_text())
  if (path / INDEX).is_file():
    files = sorted(set(json.loads((path / INDEX).read_text())['weight_map'].values()))
  else:
    files = sorted(p.name for p in path.glob('*.safetensors'))
  if not files:
    raise ValueError(f'{path} has no *.safetensors weights (pytorch_model.bin is not read: convert it to '
                     'safetensors first)')
  tensors = {}
  for name in files:
    if not (path / name).is_file():
      raise ValueError(f'{path / INDEX} lists {name}, which is missing from {path}')
    tensors.update(read_safetensors(path / name))
  return config, tensors


def write_model_dir(directory: str | os.PathLike, config: dict, tensors: dict[str, np.ndarray],
                    shard_bytes: int = SHARD_BYTES) -> list[str]:
  """Write config.json and the tensors as model.safetensors, or as shards with an index when they exceed
  `shard_bytes`, the layout save_pretrained writes; returns the weight files written."""
  path = pathlib.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
  shards, size = [{}], 0
  for name, value in tensors.items():
    if size and size + value.nbytes > shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = np.ascontiguousarray(value)
    size += value.nbytes
  metadata = {'format': 'pt'}  # what transformers expects of a safetensors file it loads
  if len(shards) == 1:
    save_file(shards[0], str(path / 'model.safetensors'), metadata=metadata)
    return ['model.safetensors']
  names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  for name, shard in zip(names, shards):
    save_file(shard, str(path / name), metadata=metadata)
  index = {'metadata': {'total_size': sum(v.nbytes for v in tensors.values())},
           'weight_map': {t: name for name, shard in zip(names, shards) for t in shard}}
  (path / INDEX).write_text(json.dumps(index, indent=2) + '\n')
  return names
