"""How a batch's jobs stop early: canceled, or failed for good (not retried)."""

from __future__ import annotations


class JobCanceled(Exception):
    """Every job of a batch was canceled; the chain stops between steps."""


class PermanentJobError(Exception):
    """A job that can never succeed (bad spec, unknown attribute, too large): failed without retries."""

    reason = "invalid"  # the failures metric's label


class JobTimeout(PermanentJobError):
    """The batch's sampling ran past the smallest job timeout of its jobs (RQ's ``job.timeout``); a retry with the
    same parameters would run as long, so it is not retried."""

    reason = "timeout"

    def __init__(self, timeout_s: float):
        super().__init__(f"timeout: sampling ran past the job timeout ({timeout_s:g} s) and was stopped")
