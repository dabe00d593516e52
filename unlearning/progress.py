"""A minimal terminal progress line: shown on a TTY, silent otherwise (pure stdlib)."""

from __future__ import annotations

import os
import sys
import time


class ProgressLine:
    """Callable ``(done, total, message)`` that redraws one stderr line, at most 10 times/s."""

    def __init__(self, label: str, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:  # UNLEARN_PROGRESS=0 silences bars (the CLI sets it for --json)
            enabled = self.stream.isatty() and os.environ.get("UNLEARN_PROGRESS", "1") != "0"
        self.enabled = enabled
        self.label = label
        self._last = 0.0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 24
        filled = int(width * min(done, total) / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {message}"[:120].ljust(120))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
