"""slmjax: dense vs Mixture-of-Experts scaling experiments in JAX / Flax NNX.

The top-level names load lazily, so `from slmjax import hugepages` runs before jax is imported.
"""

import importlib

_LAZY = {'ModelConfig': 'slmjax.config', 'Transformer': 'slmjax.model', 'abstract_model': 'slmjax.model',
         'create_model': 'slmjax.model'}
__all__ = list(_LAZY)
__version__ = '0.1.0'


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
