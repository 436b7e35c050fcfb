"""Transparent huge pages for XLA:CPU's buffers: re-exec the running script once with glibc's `hugetlb` tunable.

XLA:CPU allocates each step's temporaries as one large block (700 MB for the peer llama's 16 x 256 training
step); glibc serves blocks that large with a fresh mmap every call, so every step page-faults its whole working
set in again, 4 KiB at a time: 176,000 faults and 0.31 s of kernel time a step, measured. With
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35) malloc asks for transparent huge pages on those blocks:
about 500 faults a step, and the step is 950 -> 770 ms. The tunable is read when the process starts, hence the
re-exec; it must come before anything slow (this module imports nothing heavy, `slmjax` imports lazily).

Skipped where it cannot help (not Linux, not glibc >= 2.35, THP set to never) or when SLMJAX_HUGEPAGES=0.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def _thp_enabled() -> bool:
  try:
    with open(THP_MODE_FILE) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def hugepage_env(environ: dict[str, str], system: str, libc: tuple[str, str], thp: bool) -> dict[str, str] | None:
  """The environment to re-exec with, or None when the current one should stay (already set, or no use)."""
  if environ.get('SLMJAX_HUGEPAGES', '1') == '0' or system != 'Linux' or not thp:
    return None
  name, version = libc
  try:
    major, minor = (int(part) for part in version.split('.')[:2])
  except ValueError:
    return None
  if name != 'glibc' or (major, minor) < (2, 35):
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if TUNABLE in tunables:
    return None
  return {**environ, 'GLIBC_TUNABLES': f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'}


def reexec() -> None:
  """Restart this process with huge pages on (see the module docstring); returns when nothing is to be done."""
  env = hugepage_env(dict(os.environ), platform.system(), platform.libc_ver(), _thp_enabled())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
