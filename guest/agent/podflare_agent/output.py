"""Output capture in the worker: the OutputCollector that orders and forwards what the
running exec writes, sys.stdout/sys.stderr (CapturedStream), and the fd pump (FdCapture)
for what child processes and C code write to fds 1 and 2."""

import codecs
import ctypes
import fcntl
import io
import os
import select
import threading
import time
import traceback

from .protocol import OUTPUT_FRAME, _utf8_cut, _write_all
from .runtime import _in_forked_child, _pin_helper_thread, log

PENDING_OUTPUT_CAP = 1 << 20  # producers wait beyond this: memory stays bounded
FLUSH_DELAY = 0.005  # lets a burst of small writes coalesce into one frame
DRAIN_CAP = 4 << 20  # an endlessly writing child cannot stall the end of an exec
DRAIN_TIMEOUT = 5.0
DROP_BATCH_DELAY = 0.005
# Capture pipes: fewer wake-ups for a child that writes a lot. Pages are allocated only as
# data waits in the pipe (charged to the writer's cgroup); root may exceed pipe-max-size.
PIPE_SIZE = 4 << 20
_SPLICE_F_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
# How often a write that waits for room (PENDING_OUTPUT_CAP) looks for an interrupt that
# arrived meanwhile (it is deferred there: see ExecRunner._on_sigint).
INTERRUPT_POLL = 0.05
# The worker sends its output in writes of at most this much, so that its other frames
# (alive) are not held behind megabytes the host takes slowly.
SEND_BATCH = 1 << 20


class OutputCollector:
    """Orders all output of the running exec and forwards it as `output` frames.

    Python-level writes and the fd pump append under one lock, so the order of Python
    writes is exact. Output while no exec runs is dropped; past max_output_bytes it is
    dropped and the exec is marked truncated.
    """

    def __init__(self, writer):
        self._writer = writer
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()  # frames leave in the order their data was taken
        self._job_id = None
        self._room = 0
        self._truncated = False
        self._chunks = []  # [stream, bytearray]; neighbours have different streams
        self._pending = 0
        # Set by the ExecRunner: on the main thread, True once an interrupt for the running
        # exec was deferred (it arrived while the agent's own code ran), so a write waiting
        # for room gives up and its caller raises the KeyboardInterrupt.
        self.interrupted = lambda: False
        # Set by the main thread once an interrupted exec's code has stopped: the next
        # write of its output says so first (an `alive` frame with "ending").
        self.ending = None

    def start(self):
        threading.Thread(target=self._flush_loop, name="podflare-flusher", daemon=True).start()

    def begin(self, job_id, limit):
        with self._cond:
            self._job_id, self._room, self._truncated = job_id, limit, False
            self.ending = None

    def dropping(self):
        """True while output would be dropped anyway (no exec, or past its limit): lets
        producers skip decoding and encoding it."""
        return self._job_id is None or self._truncated

    def push(self, stream, text):
        if self._truncated and text:  # cheap: 1 GiB of output past the limit costs no copies
            with self._cond:
                if self._job_id is not None and self._truncated:
                    return
        data = str.encode(text, "utf-8", "replace")  # never a subclass's (user) encode()
        with self._cond:
            while self._job_id is not None and self._pending >= PENDING_OUTPUT_CAP and not self.interrupted():
                self._cond.wait(INTERRUPT_POLL)
            if self._job_id is None or not data or self.interrupted():
                return  # interrupted (during the encoding, say): dropped; the caller raises
            if len(data) > self._room:
                data = data[: _utf8_cut(data, 0, self._room)]
                self._truncated = True
                self._room = len(data)  # after the cut nothing more gets through
                if not data:
                    return
            if self._chunks and self._chunks[-1][0] == stream:
                self._chunks[-1][1] += data
            else:
                self._chunks.append([stream, bytearray(data)])
            self._room -= len(data)
            if not self._pending:
                self._cond.notify_all()
            self._pending += len(data)

    def flush(self, final=False, exit_frame=None):
        """Sends what is pending. `final` ends the exec: `exit_frame` (marked truncated
        where output was dropped) leaves in the same write as the last output."""
        with self._send_lock:
            with self._cond:
                job_id, chunks, truncated = self._job_id, self._chunks, self._truncated
                self._chunks, self._pending = [], 0
                if final:
                    self._job_id = None
                self._cond.notify_all()
            frames = []
            for stream, data in chunks:
                start = 0
                while start < len(data):
                    end = _utf8_cut(data, start, OUTPUT_FRAME)
                    frames.append(self._writer.encode({"type": "output", "id": job_id, "stream": stream}, bytes(data[start:end])))
                    start = end
            if exit_frame is not None:
                if truncated:
                    exit_frame["truncated"] = True
                frames.append(self._writer.encode(exit_frame))
            batch, size = self._ending_frame(job_id), 0
            for frame in frames:
                batch.append(frame)
                size += len(frame)
                if size >= SEND_BATCH:
                    self._writer.send_encoded(b"".join(batch))
                    batch, size = self._ending_frame(job_id), 0
            if batch:
                self._writer.send_encoded(b"".join(batch))
        return truncated

    def _ending_frame(self, job_id):
        if job_id is None or self.ending != job_id:
            return []
        self.ending = None
        return [self._writer.encode({"type": "alive", "id": job_id, "ending": True})]

    def _flush_loop(self):
        _pin_helper_thread()
        while True:
            try:
                with self._cond:
                    while not self._chunks:
                        self._cond.wait()
                time.sleep(FLUSH_DELAY)
                self.flush()
            except Exception:
                log(f"output flusher: {traceback.format_exc()}")


class CapturedStream(io.TextIOBase):
    """sys.stdout / sys.stderr: every write goes straight into the collector, in order."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, collector, stream, fd, interrupt_point=lambda: None):
        super().__init__()
        self._collector = collector
        self._interrupt_point = interrupt_point
        self._stream = stream
        self._fd = fd
        self._forked = False
        # Binary writes go to the real fd, whose capture is best-effort ordered.
        self.buffer = os.fdopen(fd, "wb", buffering=0, closefd=False)
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self):
        # A forked child (multiprocessing) has no flusher thread, and maybe a copy of a
        # held lock: it writes to the fd, which the parent's pump forwards.
        self._forked = True

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return self._fd

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self._forked:
            _write_all(self._fd, text.encode("utf-8", "replace"))
        else:
            self._collector.push(self._stream, text)
            self._interrupt_point()  # a deferred KeyboardInterrupt leaves from here
        return len(text)


class FdCapture:
    """Points fds 1 and 2 at pipes and forwards what arrives, so output of child
    processes (os.system, subprocess, bash) and of C code reaches the host too."""

    def __init__(self, collector):
        self._collector = collector
        self._streams = {}  # pipe read end -> (stream, incremental decoder)
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = os.pipe()
            try:
                # Fewer wake-ups for a child that writes a lot (a full pipe of 64 KiB
                # makes it wait for every pump round trip).
                fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
            os.dup2(write_end, fd)  # inheritable: children write here
            os.close(write_end)
            os.set_blocking(read_end, False)
            self._streams[read_end] = (stream, codecs.getincrementaldecoder("utf-8")("replace"))
        self._wake_r, self._wake_w = os.pipe()
        self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self._drained = threading.Event()
        self._libc = ctypes.CDLL(None)
        # Set by the pump from before it reads a pipe until what it read is in the
        # collector: lets drain() skip the round trip to the pump when nothing is pending.
        self._busy = False

    def start(self):
        threading.Thread(target=self._pump, name="podflare-fd-pump", daemon=True).start()

    def drain(self):
        """Returns once what was written to fds 1/2 so far is in the collector (main thread only)."""
        self._libc.fflush(None)  # C stdio buffers fully when fd 1 is a pipe
        if _in_forked_child():
            return  # no pump in this process
        # Fast path (most cells write only through sys.stdout): nothing is waiting in the
        # pipes and the pump holds nothing unpushed. Poll first, then check busy: data
        # the pump took before the poll keeps busy set until it is in the collector.
        pending = select.poll()
        for fd in list(self._streams):
            pending.register(fd, select.POLLIN)
        if not pending.poll(0) and not self._busy:
            return
        self._drained.clear()
        os.write(self._wake_w, b"\0")
        if not self._drained.wait(DRAIN_TIMEOUT):
            log("fd drain timed out")

    def _pump(self):
        _pin_helper_thread()
        poller = select.poll()
        for fd in [*self._streams, self._wake_r]:
            poller.register(fd, select.POLLIN)
        while True:
            try:
                drain = False
                for fd, _ in poller.poll():
                    if fd == self._wake_r:
                        os.read(self._wake_r, 64)
                        drain = True
                    elif not self._forward(fd, 64 << 10, final=False):
                        poller.unregister(fd)
                if drain:
                    # Done here rather than by the caller, so nothing read concurrently
                    # can overtake it.
                    for fd in list(self._streams):
                        if not self._forward(fd, DRAIN_CAP, final=True):
                            poller.unregister(fd)
                    self._drained.set()
                elif self._collector.dropping():
                    # Output that is dropped anyway: let the pipe fill up (4 MiB) between
                    # splices instead of waking for each of the writer's small writes
                    # (8 KiB for coreutils; 1 GiB is 131072 wake-ups otherwise).
                    time.sleep(DROP_BATCH_DELAY)
            except Exception:
                log(f"fd pump: {traceback.format_exc()}")

    def _forward(self, fd, budget, final):
        """Forwards up to `budget` bytes; False once every writer of the pipe is gone."""
        stream, decoder = self._streams[fd]
        self._busy = True
        try:
            return self._read_and_push(fd, stream, decoder, budget, final)
        finally:
            self._busy = False

    def _read_and_push(self, fd, stream, decoder, budget, final):
        while budget > 0:
            if self._collector.dropping():
                # Past the exec's limit (or between execs): discard without copying it
                # through Python, at pipe speed.
                try:
                    moved = os.splice(fd, self._null, PIPE_SIZE, flags=_SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    break
                except OSError:  # no splice here: read and drop
                    try:
                        moved = len(os.read(fd, PIPE_SIZE))
                    except BlockingIOError:
                        break
                if moved:
                    decoder.reset()
                    budget -= moved
                    if not final:
                        break
                    continue
                data = b""  # EOF
            else:
                try:
                    data = os.read(fd, min(budget, 64 << 10))
                except BlockingIOError:
                    break
            if not data:
                # User code closed fd 1 or 2 everywhere: stop watching this pipe.
                del self._streams[fd]
                os.close(fd)
                return False
            budget -= len(data)
            self._collector.push(stream, decoder.decode(data))
            if not final:
                break
        if final:
            self._collector.push(stream, decoder.decode(b"", final=True))
        return True
