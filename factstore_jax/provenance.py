"""Where a result came from: the library's git commit and the command line.

Experiment scripts append :func:`footer` to the summaries they write, so a
checked-in summary names the code and the flags that produced it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Sequence

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str, cwd: str) -> str | None:
  try:
    proc = subprocess.run(['git', '-C', cwd, *args], capture_output=True,
                          text=True, timeout=30, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return proc.stdout.strip() if proc.returncode == 0 else None


def library_commit(root: str | os.PathLike | None = None) -> str | None:
  """The git commit of the checkout holding the library, or ``None``.

  Args:
    root: the checkout (default: the folder above this package).

  Returns:
    The full ``HEAD`` hash, with ``+dirty`` appended when tracked files of the
    package differ from it; ``None`` when the library is not in a git
    checkout (e.g. installed from a wheel) or git is missing.
  """
  root = os.fspath(_PACKAGE_ROOT if root is None else root)
  commit = _git('rev-parse', 'HEAD', cwd=root)
  if not commit:
    return None
  changed = _git('status', '--porcelain', '--untracked-files=no', '--',
                 'factstore_jax', cwd=root)
  return commit + ('+dirty' if changed else '')


def command_line(argv: Sequence[str] | None = None) -> str:
  """``argv`` (default ``sys.argv``) as a shell command starting ``python``.

  The script path is made relative to the current folder when it lies
  inside it, so the command reads as run from the repository root.
  """
  argv = list(sys.argv if argv is None else argv)
  if not argv:
    return 'python'
  script = argv[0]
  if os.path.isabs(script):
    rel = os.path.relpath(script)
    if not rel.startswith(os.pardir):
      script = rel
  return ' '.join(shlex.quote(a) for a in ['python', script, *argv[1:]])


# The library's commit when this module was first imported: experiment
# scripts import it at their start, so a long run records the code it ran
# even if commits land while it runs (the working tree's HEAD at the end
# would name a later commit).
_RUN_COMMIT = library_commit()


def run_commit() -> str | None:
  """:func:`library_commit` as it was when this module was first imported
  (a script's start), the code a run that imported it executes."""
  return _RUN_COMMIT


def footer(argv: Sequence[str] | None = None,
           root: str | os.PathLike | None = None) -> str:
  """A Markdown paragraph naming the command and the library commit.

  The commit is :func:`run_commit` (the library at import), or with
  ``root`` that checkout's :func:`library_commit` now.
  """
  commit = run_commit() if root is None else library_commit(root)
  where = f'commit `{commit}`' if commit else 'an unknown commit (no git)'
  return (f'\nProduced by `{command_line(argv)}` with the library at '
          f'{where}.\n')
