"""slmjax: dense vs Mixture-of-Experts scaling experiments in JAX / Flax NNX."""

from slmjax.config import ModelConfig
from slmjax.model import Transformer, abstract_model, create_model

__all__ = ['ModelConfig', 'Transformer', 'abstract_model', 'create_model']
__version__ = '0.1.0'
