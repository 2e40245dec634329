"""Faults in the data path: `SkipLog` counts skipped samples per reason (each batch carries its
share, see `collate.stats`), logs them at a limited rate and raises `DataError` in strict mode."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

#: Reasons a sample is skipped: `schema.decode_sample`'s, plus `truncated_tar` (the sample at the
#: point where a shard breaks off is incomplete) and `read_error` (a shard that cannot be opened or
#: is not a tar at all; this one counts shards, not samples).
SKIP_REASONS = ("bad_json", "bad_record", "missing_image", "missing_mask", "bad_mask", "mask_size", "no_expression",
                "bad_image", "truncated_tar", "read_error")

class DataError(RuntimeError):
    """A data problem the stream does not skip: any fault in strict mode, or a source without data."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkipLog:
    """Counts skipped samples per reason, logs them at a limited rate, raises in strict mode.

    One per worker. The first `log_first` skips of each reason are logged one by one, later ones
    as a summary at most every `log_interval_s` seconds. `take()` returns the counts since the
    previous call, which is how each batch carries exactly the skips made while producing it."""

    def __init__(self, strict: bool = False, *, log_first: int = 3, log_interval_s: float = 60.0):
        self.strict = strict
        self.log_first, self.log_interval_s = log_first, log_interval_s
        self._muted = False
        self._delta: Counter[str] = Counter()
        self._seen: Counter[str] = Counter()
        self._unreported: Counter[str] = Counter()
        self._last_report = time.monotonic()

    def skip(self, reason: str, message: str) -> None:
        """Record one skipped sample (or unreadable shard), or raise `DataError` in strict mode."""
        if self._muted:
            return
        if self.strict:
            raise DataError(reason, f"strict data mode: {message}")
        self._delta[reason] += 1
        self._seen[reason] += 1
        if self._seen[reason] <= self.log_first:
            more = " (further skips of this kind are summarised)" if self._seen[reason] == self.log_first else ""
            log.warning("skipped (%s): %s%s", reason, message, more)
            return
        self._unreported[reason] += 1
        now = time.monotonic()
        if now - self._last_report >= self.log_interval_s:
            counts = ", ".join(f"{r} {n}" for r, n in sorted(self._unreported.items()))
            log.warning("skipped %d more in %.0f s (%s); latest: %s", sum(self._unreported.values()),
                        now - self._last_report, counts, message)
            self._unreported.clear()
            self._last_report = now

    def add_reported(self, reason: str, n: int) -> None:
        """Count `n` skips that were already reported (logged) elsewhere."""
        self._delta[reason] += n
        self._seen[reason] += n

    def note(self, message: str) -> None:
        """Log an event that loses no sample (e.g. a shard that breaks off after a complete sample)."""
        if not self._muted:
            log.warning("%s", message)

    @contextmanager
    def muted(self) -> Iterator[None]:
        """Neither count nor log: used while replaying data that earlier batches already accounted for."""
        self._muted = True
        try:
            yield
        finally:
            self._muted = False

    def take(self) -> dict[str, int]:
        """Skip counts per reason since the previous call (every reason present, zeros included)."""
        out = {r: self._delta.get(r, 0) for r in SKIP_REASONS}
        out.update({r: n for r, n in self._delta.items() if r not in out})
        self._delta.clear()
        return out
