"""Atomic file writes: a file is either its old self or its new self, never half-written.

Every writer in slmjax (run configs and summaries, metrics logs, results rows, plots, downloads) goes through
`replacing`: the content goes to a temporary file of a unique name in the same directory (so concurrent writers
never share one), is flushed to disk, then renamed over the target; on an error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = '') -> Iterator[pathlib.Path]:
  """Yield a temporary path beside `path`; when the block ends without an error it replaces `path`.

  `suffix` keeps the extension for writers that choose their format by it (matplotlib's savefig).
  """
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix=f'.tmp{suffix}')
  os.close(fd)
  try:
    yield pathlib.Path(tmp)
    with open(tmp, 'rb+') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  with replacing(path) as tmp:
    tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=1, sort_keys=True))
