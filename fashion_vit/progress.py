"""A progress line for long jobs, on stderr: files done out of files found, images/s
and the time left. On a terminal one line redrawn in place with a bar; otherwise (a
log file, `ray job submit`, CI) a plain line every PLAIN_INTERVAL seconds."""

from __future__ import annotations

import sys
import threading
import time

TTY_INTERVAL = 1.0  # seconds between redraws on a terminal
PLAIN_INTERVAL = 5.0  # seconds between plain lines
BAR = 24  # characters


class Progress:
    """Polls `count()` (files done in this run) from a thread while the block runs.

    total: files in the job; before: files already done by an earlier, interrupted run."""

    def __init__(self, count, total: int, before: int = 0, stream=None, quiet: bool = False, label: str = "files"):
        self.count, self.total, self.before, self.label = count, total, before, label
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = TTY_INTERVAL if self.tty else PLAIN_INTERVAL
        self.first_done_at: float | None = None  # seconds from start to the first file done
        self._stop = threading.Event()
        self._start = time.perf_counter()

    def __enter__(self):
        self._start = time.perf_counter()
        if not self.quiet:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        else:
            self._thread = threading.Thread(target=self._watch_first, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if not self.quiet:
            self._draw(final=True)

    def line(self, done: int, elapsed: float) -> str:
        """e.g. "predict: 59392/200192 files (29.7%), 1185 images/s, 1m59s left"."""
        # Predictions made again (a lost actor's batches) count in `done` but not here.
        total_done = min(self.before + done, self.total)
        share = total_done / self.total if self.total else 1.0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - total_done) / rate if rate > 0 else None
        text = f"{total_done}/{self.total} {self.label} ({share:.1%}), {rate:.0f} images/s, " + (
            f"{_duration(left)} left" if left is not None else "time left unknown"
        )
        if self.tty:
            filled = round(BAR * share)
            text = "[" + "#" * filled + "." * (BAR - filled) + "] " + text
        return text

    def _watch_first(self):
        while not self._stop.wait(0.5):
            self._note_first(self._safe_count())

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._draw()

    def _draw(self, final: bool = False):
        done = self._safe_count()
        self._note_first(done)
        text = self.line(done, time.perf_counter() - self._start)
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _note_first(self, done: int):
        if done and self.first_done_at is None:
            self.first_done_at = time.perf_counter() - self._start

    def _safe_count(self) -> int:
        try:
            return int(self.count())
        except Exception:  # a lost counter must not end the job; the line just stalls
            return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
