"""The explicit coordinator of a multi-host start (--coordinator_address, --num_processes,
--process_id): the flags checked before JAX sees them, and a start-up deadline that ends a run
whose processes do not all join with one error line instead of JAX's abort."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import threading

from pyramidnet_jax import cli


def check_flags(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None) -> bool:
  """Whether the flags ask for an explicit coordinator; ValueError if they do so incompletely or
  the index is out of range."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if not any(given):
    return False
  if not all(given):
    raise ValueError('--coordinator_address, --num_processes and --process_id go together: '
                     'give all three (the same address and count on every process).')
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                     f'{num_processes}).')
  return True


def parse_address(address: str) -> tuple[str, int]:
  """HOST and PORT of a --coordinator_address, the host resolved; ValueError if either is bad."""
  host, _, port = address.rpartition(':')
  host = host.strip('[]')  # [IPv6]:PORT
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'--coordinator_address={address} is not HOST:PORT (e.g. 10.0.0.1:1234, '
                     'the address of process 0 and a free port).')
  try:
    socket.getaddrinfo(host, int(port))
  except (socket.gaierror, UnicodeError) as e:
    raise ValueError(f'--coordinator_address={address}: host {host!r} cannot be resolved '
                     f'({getattr(e, "strerror", e)}); give the address of process 0.') from None
  return host, int(port)


def check_port_free(port: int, address: str) -> None:
  """Process 0 serves the coordinator on `port`; JAX crashes when it is taken."""
  for family, any_host in ((socket.AF_INET6, '::'), (socket.AF_INET, '0.0.0.0')):
    try:
      with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As the coordinator's server.
        s.bind((any_host, port))
      return
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise ValueError(f'--coordinator_address={address}: port {port} is in use on this host '
                         '(by another run\'s coordinator?); choose a free port for every '
                         'process.') from None
  # Neither family could bind for another reason: let JAX try and report it.


@contextlib.contextmanager
def startup_deadline(timeout_s: float, message):
  """Ends the process with one error line if the block has not finished in `timeout_s`.

  JAX's start-up waits in C++ and aborts the process at its own timeout, so the deadline is a
  thread that exits the process first.
  """
  def expire():
    print(f'error: {cli.one_line(message())}', file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access
  timer = threading.Timer(timeout_s, expire)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def not_joined_message(address: str, host: str, port: int, num_processes: int, process_id: int,
                timeout_s: int) -> str:
  if process_id != 0:
    try:
      socket.create_connection((host, port), timeout=5).close()
    except OSError:
      return (f'nothing answers at --coordinator_address={address} after {timeout_s}s: start '
              'process 0 there (with the same --coordinator_address and --num_processes), or '
              'raise --startup_timeout_s.')
  # JAX does not say how many arrived, only that some did not.
  return (f'not all {num_processes} processes (--num_processes) joined at {address} within '
          f'{timeout_s}s: start the missing ones with the same --coordinator_address and '
          '--num_processes and their own --process_id, or raise --startup_timeout_s.')
