"""Fault-injection hooks for the crash-resume tests and the kill soak; inert unless the env asks."""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """SIGKILL this process when TRACKSTAR_KILL_AT names this point (crash-resume tests)."""
    if os.environ.get("TRACKSTAR_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
