"""Observe what the code under test does to the outside world, through Python's audit hooks (PEP 578).

Audit events are raised by the interpreter itself for every ``open``, ``socket.connect``, process spawn and so
on, so these checks see the real calls of TotalSegmentator, nnU-Net and torch without replacing any of them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sys
import threading

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_SPAWN_EVENTS = {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec"}
_FS_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "tempfile.mkstemp", "tempfile.mkdtemp"}


class Events(list):
    def opens(self) -> list[str]:
        return [args[0] for event, args in self if event == "open"]

    def writes(self) -> list:
        out = []
        for event, args in self:
            if event == "open":
                path, mode, flags = (list(args) + [None, None])[:3]
                if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & _WRITE_FLAGS
                ):
                    out.append(path)
            elif event in _FS_EVENTS:
                out.append((event, args[0] if args else None))
        return out

    def spawns(self) -> list:
        return [(event, args[:1]) for event, args in self if event in _SPAWN_EVENTS]

    def connections(self) -> list:
        return [args[1] for event, args in self if event == "socket.connect"]


_recording: list[Events] = []
_lock = threading.Lock()


def _hook(event: str, args: tuple) -> None:
    if _recording and (event == "open" or event in _SPAWN_EVENTS or event in _FS_EVENTS or event == "socket.connect"):
        with _lock:
            for events in _recording:
                events.append((event, args))
    if event == "socket.getaddrinfo" and not _is_loopback(args[0]):
        raise ConnectionRefusedError(f"test network guard: {args[0]!r} is not loopback")
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            raise ConnectionRefusedError(f"test network guard: {address!r} is not loopback")


def _is_loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost", "", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def install() -> None:
    """Refuse any non-loopback connection from the test process, for the whole session (hooks are permanent)."""
    if not getattr(sys, "_ray_app_guard_installed", False):
        sys.addaudithook(_hook)
        sys._ray_app_guard_installed = True


@contextlib.contextmanager
def audit():
    """Record file opens, filesystem changes, spawns and connections made inside the block."""
    install()
    events = Events()
    with _lock:
        _recording.append(events)
    try:
        yield events
    finally:
        with _lock:
            _recording.remove(events)
