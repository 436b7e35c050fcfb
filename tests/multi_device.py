"""The environment of a subprocess that sees 8 simulated CPU devices (the flag must be set before jax is imported),
keeping the session's own XLA flags (conftest.py)."""

import os

ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu',
       'XLA_FLAGS': f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()}
