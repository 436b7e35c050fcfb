"""Multi-process start-up: `jax.distributed.initialize` when the environment says there are several processes.

Sources, in order: explicit flags (--coordinator, --num_processes, --process_id), SLURM (SLURM_NTASKS > 1; JAX
reads the coordinator and ranks from SLURM's variables), a TPU VM slice with several hosts (JAX auto-detects it
from the TPU metadata). On CPU, cross-process collectives use gloo. One process and no flags: nothing to do.
Call `initialize()` before any other JAX call.
"""

from __future__ import annotations

import os

import jax
from absl import flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  if 'coordinator' in FLAGS:
    return
  flags.DEFINE_string('coordinator', None, 'host:port of process 0, for several processes started by hand.')
  flags.DEFINE_integer('num_processes', None, 'How many processes take part (with --coordinator).')
  flags.DEFINE_integer('process_id', None, 'This process\'s rank, 0..num_processes-1 (with --coordinator).')
  flags.DEFINE_string('mesh', '', 'Device mesh, e.g. data:2,expert:4 or data:-1 (see slmjax.sharding); '
                      'empty = one device, no sharding.')


def launch_mode(coordinator: str | None, num_processes: int | None, process_id: int | None,
                environ=os.environ) -> str:
  """'flags', 'slurm', 'tpu' or 'single': how (whether) this process joins a multi-process job."""
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise ValueError('--coordinator, --num_processes and --process_id go together; give all three')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, --num_processes={num_processes})')
    return 'flags'
  if int(environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in environ:
    return 'slurm'
  if environ.get('TPU_WORKER_HOSTNAMES', '').count(',') >= 1:
    return 'tpu'
  return 'single'


def initialize() -> int:
  """Join the multi-process job the flags or environment describe; returns the process count."""
  mode = launch_mode(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  if mode == 'single':
    return 1
  # Gloo gives the CPU backend cross-process collectives; it only affects the CPU client, so it is safe to set on
  # GPU / TPU hosts too (asking for the backend here would initialise JAX too early).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if mode == 'flags':
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  else:
    jax.distributed.initialize()  # SLURM and TPU VM: JAX's own cluster detection
  return jax.process_count()
