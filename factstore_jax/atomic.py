"""Atomic file output: write a temp file beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from factstore_jax.errors import FactStoreError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = '.tmp') -> Iterator[str]:
  """Yields a temporary path in ``path``'s folder; on success it replaces
  ``path`` (``os.replace``, keeping an existing file's mode), on any error it
  is removed and ``path`` is untouched.

  ``suffix`` lets writers that infer a format from the name (matplotlib)
  see the right extension.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FactStoreError(f'{path}: folder {folder} does not exist')
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.',
                             suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` atomically."""
  with atomic_output(path) as tmp, open(tmp, 'w') as f:
    f.write(text)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
  """Saves a matplotlib figure atomically (format from ``path``) and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  with atomic_output(path, suffix=os.path.splitext(os.fspath(path))[1]) as tmp:
    fig.savefig(tmp, dpi=dpi)
  plt.close(fig)
