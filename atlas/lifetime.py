"""Process lifetime: a child that must not outlive its parent, even a SIGKILLed one."""

from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent_signal(sig: signal.Signals) -> None:
    """Have the kernel send this process `sig` when its parent dies (Linux; elsewhere a
    no-op). Call it in the child (a preexec_fn or a pool initializer)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
