"""What the jobs print for people: one prefixed line per step, durations in words."""

from __future__ import annotations

import sys

PREFIX = "[ray-galaxy]"


def log(msg: str) -> None:
    """One line of progress on stdout."""
    # Not print(): inside Ray Train workers print is patched to also log, doubling each line.
    sys.stdout.write(f"{PREFIX} {msg}\n")
    sys.stdout.flush()


def fmt_seconds(s: float) -> str:
    """Seconds as '42s', '3m07s' or '1h02m'."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
