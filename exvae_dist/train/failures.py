"""Deterministic errors end a Ray run at once instead of being retried.

Ray Train restarts the worker group after any worker error, up to ray.max_failures times, from
the last checkpoint. That suits a lost node; an error that is known and deterministic
(errors.find_known: a config error, a non-finite loss at train.lr=1e6, a corrupt store or
checkpoint, a full disk) fails the same way each time, after the ~12 s start-up of every
attempt. This callback runs on Ray Train's controller when a worker raises: a known error is
raised again there, which Ray Train treats as a controller error that is not retried, and
the driver gets it back as result.error (cli.guarded prints its message in one line).
"""

from __future__ import annotations

from ray.train import UserCallback

from ..common.errors import find_known


class StopOnKnownError(UserCallback):
    def after_exception(self, run_context, worker_exceptions):
        for rank in sorted(worker_exceptions):
            known = find_known(worker_exceptions[rank])
            if known is not None:
                raise known
