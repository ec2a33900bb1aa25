"""The bounded FIFO of execs that the worker's runner and the control process's scheduler
both keep."""

import collections
import threading

from .protocol import MAX_QUEUED_EXECS


class ExecQueue:
    """The FIFO of execs both the worker's runner and the control process's scheduler
    keep: bounded submission, and shutdown when the channel is gone for good."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._current = None
        self._closing = False

    def submit(self, job):
        with self._cond:
            if self._closing or len(self._queue) >= MAX_QUEUED_EXECS:
                return False
            self._queue.append(job)
            self._cond.notify_all()
            return True

    def shutdown(self):
        """The channel is gone for good: drop the queue and interrupt the running exec."""
        with self._cond:
            self._closing = True
            self._queue.clear()
            if self._current is not None and self._current.reason is None:
                self._current.reason = "cancel"
            self._cond.notify_all()

