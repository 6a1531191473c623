"""Multi-controller runs: one JAX process per host under ``jax.distributed``.

* :func:`initialize_distributed` joins (or starts) a multi-process JAX job:
  a no-op when already initialised or when no coordinator is given (one
  process); gloo collectives on CPU; a clean one-line error, within a bounded
  time, when the coordinator cannot be reached or a peer never joins.
* :func:`define_flags` / :func:`initialize_from_flags`: the absl flags every
  sweeping experiment and benchmark takes (``--coordinator_address``,
  ``--num_processes``, ``--process_id``: JAX's own names; ``--distributed_auto``
  for ``jax.distributed.initialize()`` with no arguments, as on TPU pods and
  under SLURM; ``--merge_only``) and the call that acts on them.
* :func:`barrier` / :func:`all_gather`: what the sweep runner
  (:func:`factstore_jax.sweep.run_sweep`) synchronises with; they raise
  :class:`DistributedError` naming the coordinator and process when a peer is
  gone.

Which flags start what:

* none of the three (and no ``--distributed_auto``): one process, nothing
  initialised;
* all three: ``jax.distributed.initialize(address, num_processes, process_id)``;
* ``--distributed_auto``: ``jax.distributed.initialize()`` with whichever of
  the three are given, the rest detected from the cluster (Cloud TPU, SLURM,
  Open MPI, Kubernetes);
* some but not all three without ``--distributed_auto``: an error naming the
  missing ones (a half-configured job would otherwise hang or run alone).

Failure behaviour. An unreachable coordinator, or peers that do not join,
ends the process after ``timeout_s`` with one line on stderr naming the
coordinator address and process id, exit status 1. A peer that dies while
the others wait at a sweep barrier or gather makes them exit the same way.
A peer that dies while the others compute is detected by JAX's heartbeat
(``heartbeat_timeout_s``); JAX then ends the survivors itself (exit status
134, its own "Terminating process because the JAX distributed service
detected fatal errors" message). Finished rows are on disk either way.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, NamedTuple

import jax
import numpy as np

from factstore_jax.errors import FactStoreError

# Extra seconds JAX's own initialisation timeout gets over ours, so that the
# clean message (ours) comes before JAX's abort.
_JAX_TIMEOUT_MARGIN_S = 30


class DistributedError(FactStoreError):
  """A multi-process run cannot go on (coordinator unreachable, peer gone)."""


class ProcessInfo(NamedTuple):
  """Where this process stands in the job.

  Attributes:
    process_id: this process's index, ``0 <= process_id < num_processes``.
    num_processes: processes in the job (1 when not distributed).
    coordinator_address: ``host:port`` of the coordinator, or ``None`` (one
      process, or detected by JAX and not known here).
  """
  process_id: int
  num_processes: int
  coordinator_address: str | None


_state: dict[str, Any] = {'info': None}


def _is_initialized() -> bool:
  fn = getattr(jax.distributed, 'is_initialized', None)
  if fn is not None:
    return bool(fn())
  return _state['info'] is not None


def process_info() -> ProcessInfo:
  """This process's :class:`ProcessInfo` (one process when not initialised)."""
  if _state['info'] is not None:
    return _state['info']
  if not _is_initialized():
    return ProcessInfo(0, 1, None)
  return ProcessInfo(jax.process_index(), jax.process_count(),
                     _coordinator_from_jax())


def _coordinator_from_jax() -> str | None:
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    return jax_distributed.global_state.coordinator_address
  except (ImportError, AttributeError):
    return None


def describe(info: ProcessInfo | None = None) -> str:
  """``'process 1 of 2 (coordinator 10.0.0.2:1234)'``: for error messages."""
  info = process_info() if info is None else info
  where = info.coordinator_address or 'detected by JAX'
  return (f'process {info.process_id} of {info.num_processes} '
          f'(coordinator {where})')


def _check_address(address: Any) -> None:
  if not isinstance(address, str) or ':' not in address:
    raise FactStoreError(
        f'coordinator_address must be "host:port"; got {address!r}')
  host, port = address.rsplit(':', 1)
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise FactStoreError(
        f'coordinator_address must be "host:port" with a port in 1..65535; '
        f'got {address!r}')


def _check_int(name: str, value: Any, low: int) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < low):
    raise FactStoreError(f'{name} must be an int >= {low}; got {value!r}')


def _one_line(text: str) -> str:
  return ' '.join(str(text).split())


def exit_with_error(message: str, status: int = 1) -> None:
  """Writes ``message`` as one line to stderr and ends the process now.

  ``os._exit``: JAX's exit handler would otherwise wait at its shutdown
  barrier for the peers that are gone.
  """
  sys.stdout.flush()
  sys.stderr.write(f'factstore: error: {_one_line(message)}\n')
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           auto: bool = False, timeout_s: int = 300,
                           heartbeat_timeout_s: int = 100) -> ProcessInfo:
  """Joins a multi-process JAX job (``jax.distributed.initialize``).

  Call it first, before anything else uses JAX. A no-op returning the job's
  :class:`ProcessInfo` when JAX is initialised already (by this call or by
  other code), and when none of the three arguments is given and ``auto``
  is false (one process). On CPU, cross-process collectives use gloo (set
  unless another implementation is configured).

  If the coordinator cannot be reached, or the other processes do not all
  join, within ``timeout_s``: writes one line naming the coordinator address
  and process id to stderr and ends the process with status 1 (JAX's own
  failure would abort with a stack trace, later).

  Args:
    coordinator_address: ``'host:port'`` of process 0 (it binds the port).
    num_processes: processes in the job (>= 1).
    process_id: this process's index in ``[0, num_processes)``.
    auto: call ``jax.distributed.initialize`` even with some or all of the
      three missing, letting JAX detect them (Cloud TPU, SLURM, Open MPI).
    timeout_s: seconds to wait for the coordinator and the peers (>= 1).
    heartbeat_timeout_s: seconds without a heartbeat after which JAX
      declares a process dead and ends the others (>= 1).

  Returns:
    This process's :class:`ProcessInfo`.

  Raises:
    FactStoreError: bad arguments (some but not all of the three without
      ``auto``; a malformed address; ids out of range); nothing is started.
    DistributedError: JAX refused to initialise (e.g. JAX already ran
      computations in this process), or the arguments disagree with the job
      already initialised.
  """
  given = dict(coordinator_address=coordinator_address,
               num_processes=num_processes, process_id=process_id)
  if coordinator_address is not None:
    _check_address(coordinator_address)
  if num_processes is not None:
    _check_int('num_processes', num_processes, 1)
  if process_id is not None:
    _check_int('process_id', process_id, 0)
    if num_processes is not None and process_id >= num_processes:
      raise FactStoreError(
          f'process_id must be < num_processes; got process_id={process_id},'
          f' num_processes={num_processes}')
  _check_int('timeout_s', timeout_s, 1)
  _check_int('heartbeat_timeout_s', heartbeat_timeout_s, 1)
  missing = [k for k, v in given.items() if v is None]
  if not auto and missing and len(missing) < 3:
    raise FactStoreError(
        f'distributed: {", ".join(missing)} missing: give all of '
        'coordinator_address, num_processes and process_id, none of them '
        '(one process), or auto=True (--distributed_auto) to let JAX detect '
        'the rest')

  if _is_initialized():
    info = process_info()
    for name, have in (('num_processes', info.num_processes),
                       ('process_id', info.process_id)):
      if given[name] is not None and given[name] != have:
        raise DistributedError(
            f'distributed: already initialised as {describe(info)}; asked '
            f'for {name}={given[name]}')
    return info
  if not auto and len(missing) == 3:
    return ProcessInfo(0, 1, None)

  if jax.config.jax_cpu_collectives_implementation in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  where = (f'process {"?" if process_id is None else process_id} of '
           f'{"?" if num_processes is None else num_processes} (coordinator '
           f'{coordinator_address or "to be detected"})')
  watchdog = threading.Timer(timeout_s, exit_with_error, args=(
      f'distributed: {where} could not reach the coordinator or not every '
      f'process joined within {timeout_s} s',))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
        coordinator_address, None if num_processes is None else
        int(num_processes), None if process_id is None else int(process_id),
        initialization_timeout=timeout_s + _JAX_TIMEOUT_MARGIN_S,
        heartbeat_timeout_seconds=heartbeat_timeout_s)
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedError(
        f'distributed: {where} could not initialise: {_one_line(e)}') from e
  finally:
    watchdog.cancel()
  _state['info'] = ProcessInfo(jax.process_index(), jax.process_count(),
                               coordinator_address or _coordinator_from_jax())
  return _state['info']


# ---------------------------------------------------------------------------
# Synchronisation.
# ---------------------------------------------------------------------------

_barriers = {'count': 0}


def barrier(name: str, timeout_s: float = 7 * 24 * 3600) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op alone).

  Every process must call the same barriers in the same order. Uses the
  coordination service's barrier (no device collective, so a process may
  wait hours for a slower one) and falls back on
  ``multihost_utils.sync_global_devices`` where JAX lacks it.

  Raises:
    DistributedError: a peer is gone, or ``timeout_s`` passed.
  """
  info = process_info()
  if info.num_processes == 1:
    return
  _barriers['count'] += 1
  barrier_id = f'factstore/{_barriers["count"]}/{name}'
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    client = jax_distributed.global_state.client
    wait = getattr(client, 'wait_at_barrier', None)
  except (ImportError, AttributeError):
    wait = None
  try:
    if wait is not None:
      wait(barrier_id, int(timeout_s * 1000))
    else:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(barrier_id)
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedError(
        f'{describe(info)}: barrier {name!r} failed (a peer died or never '
        f'arrived): {_one_line(e)}') from e


def all_gather(value: np.ndarray) -> np.ndarray:
  """Every process's ``value`` stacked: ``(num_processes, *value.shape)``.

  Every process must call it with the same shape and dtype.

  Raises:
    DistributedError: a peer is gone.
  """
  value = np.asarray(value)
  info = process_info()
  if info.num_processes == 1:
    return value[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    return np.asarray(multihost_utils.process_allgather(value))
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedError(
        f'{describe(info)}: gathering from every process failed (a peer '
        f'died?): {_one_line(e)}') from e


# ---------------------------------------------------------------------------
# Flags.
# ---------------------------------------------------------------------------


def define_flags(flag_values: Any = None) -> None:
  """Defines the distributed flags (idempotent) in ``flag_values``.

  ``--coordinator_address``, ``--num_processes``, ``--process_id``,
  ``--distributed_auto``, ``--distributed_timeout``,
  ``--distributed_heartbeat_timeout`` and ``--merge_only``.

  Args:
    flag_values: an ``absl.flags.FlagValues``; the global ``FLAGS`` when
      ``None``.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  defs = (
      (flags.DEFINE_string, 'coordinator_address', None,
       'host:port of process 0 (it listens there); with --num_processes and '
       '--process_id: run as one of several JAX processes '
       '(jax.distributed). Omitted: one process.', {}),
      (flags.DEFINE_integer, 'num_processes', None,
       'Processes in the job (jax.distributed).', dict(lower_bound=1)),
      (flags.DEFINE_integer, 'process_id', None,
       "This process's index, 0 .. num_processes - 1 (jax.distributed).",
       dict(lower_bound=0)),
      (flags.DEFINE_bool, 'distributed_auto', False,
       'Call jax.distributed.initialize() letting JAX detect the flags not '
       'given (TPU pods, SLURM, Open MPI).', {}),
      (flags.DEFINE_integer, 'distributed_timeout', 300,
       'Seconds to wait for the coordinator and every process to join.',
       dict(lower_bound=1)),
      (flags.DEFINE_integer, 'distributed_heartbeat_timeout', 100,
       'Seconds without a heartbeat after which a process counts as dead '
       'and JAX ends the others.', dict(lower_bound=1)),
      (flags.DEFINE_bool, 'merge_only', False,
       'Compute nothing: merge the per-process shard files (rows.p*.csv) '
       'into rows.csv and report what is there.', {}),
  )
  for define, name, default, help_text, extra in defs:
    if name not in fv:
      define(name, default, help_text, flag_values=fv, **extra)


def _excepthook(kind, value, tb):
  if isinstance(value, DistributedError):
    exit_with_error(str(value))
  _previous_hook(kind, value, tb)
  if _state['info'] is not None and _state['info'].num_processes > 1:
    # The traceback is out; skip JAX's shutdown barrier, where this process
    # would wait for peers that wait for it. They see it gone at their next
    # barrier or by the heartbeat timeout.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


_previous_hook = sys.excepthook


def initialize_from_flags(flag_values: Any = None) -> ProcessInfo:
  """:func:`initialize_distributed` from the flags of :func:`define_flags`.

  Also makes an uncaught :class:`DistributedError` end the process with one
  line on stderr and status 1 (no traceback, no wait at JAX's shutdown
  barrier for peers that are gone), and, in a multi-process job, any other
  uncaught exception end it with status 1 after its traceback.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  if sys.excepthook is not _excepthook:
    global _previous_hook  # pylint: disable=global-statement
    _previous_hook = sys.excepthook
    sys.excepthook = _excepthook
  try:
    return initialize_distributed(
        fv.coordinator_address, fv.num_processes, fv.process_id,
        auto=fv.distributed_auto, timeout_s=fv.distributed_timeout,
        heartbeat_timeout_s=fv.distributed_heartbeat_timeout)
  except DistributedError:
    raise
  except FactStoreError as e:
    # A usage error: absl prints it with the flags' help hint.
    from absl import app  # pylint: disable=g-import-not-at-top
    raise app.UsageError(str(e)) from e


def is_main_process() -> bool:
  """Whether this is process 0 (the one that writes merged outputs)."""
  return process_info().process_id == 0
