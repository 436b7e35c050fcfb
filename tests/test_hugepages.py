"""The huge-page re-exec: when it applies, and that a script really restarts with the tunable set."""

import os
import pathlib
import platform
import subprocess
import sys

from slmjax import hugepages

LINUX = dict(system='Linux', libc=('glibc', '2.36'), thp=True)


def test_sets_the_tunable_on_linux_glibc():
  env = hugepages.hugepage_env({'PATH': '/bin'}, **LINUX)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}


def test_keeps_other_tunables():
  env = hugepages.hugepage_env({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, **LINUX)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


def test_no_reexec_when_set_disabled_or_useless():
  assert hugepages.hugepage_env({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, **LINUX) is None  # user's choice
  assert hugepages.hugepage_env({'SLMJAX_HUGEPAGES': '0'}, **LINUX) is None
  assert hugepages.hugepage_env({}, **{**LINUX, 'system': 'Darwin'}) is None
  assert hugepages.hugepage_env({}, **{**LINUX, 'libc': ('glibc', '2.31')}) is None
  assert hugepages.hugepage_env({}, **{**LINUX, 'libc': ('', '')}) is None
  assert hugepages.hugepage_env({}, **{**LINUX, 'thp': False}) is None


def test_script_restarts_with_the_tunable(tmp_path):
  script = tmp_path / 'probe.py'
  script.write_text('import os, sys\nfrom slmjax import hugepages\nhugepages.reexec()\n'
                    'print(repr(sys.argv[1:]), "jax" in sys.modules, os.environ.get("GLIBC_TUNABLES"))\n')
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'SLMJAX_HUGEPAGES')}
  env['PYTHONPATH'] = os.pathsep.join(filter(None, (str(pathlib.Path(__file__).resolve().parents[1]),
                                                   os.environ.get('PYTHONPATH'))))
  out = subprocess.run([sys.executable, str(script), '--flag=1'], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  applies = hugepages.hugepage_env(env, platform.system(), platform.libc_ver(), hugepages._thp_enabled())
  assert out[:2] == ["['--flag=1']", 'False']  # arguments survive; jax was not imported before the restart
  assert out[2] == ('glibc.malloc.hugetlb=1' if applies else 'None')
