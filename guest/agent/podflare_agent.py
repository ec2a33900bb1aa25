#!/usr/bin/python3
"""podflare guest agent: serves spec/guest-protocol.md (protocol 1) over virtio-serial.

Two processes, both this file (standard library only: it is copied alone into the image):

- The control process (`podflare_agent.py`, started by init) owns the virtio port: it
  answers hello, ping, restore and file transfers, queues execs, enforces timeouts and
  cancels, and is the only writer to the port. In the guest it lives in its own cgroup
  (protected memory, high CPU weight, oom_score_adj -1000; see `Cgroups`).
- The REPL worker (`podflare_agent.py --worker`, spawned by the control process over a
  socket pair) runs user code with the ExecRunner below, in the `user` cgroup subtree
  (memory.max, pids.max, low CPU weight), so an out-of-memory kill or a fork bomb ends
  the worker, never the agent. Each exec runs with the worker moved into its own cgroup
  (user/exec-<n>), so a timeout or cancel can kill every process the call started,
  setsid'd or double-forked ones included. The control process relays the worker's
  frames to the host and trusts none of them (user code runs in the worker and can write
  to its socket): every frame is bounded, validated, re-encoded, and output is capped
  again. A worker that dies mid-exec ends that exec with one exit frame saying so, and a
  fresh worker is started.

Threads of the control process:
- main: the dispatcher; runs execs one at a time from a FIFO queue on the worker, times
  them out, interrupts them, kills their cgroups, respawns the worker.
- reader: parses host frames and answers everything but exec itself (ping must be
  answered while user code runs); execs are queued for the dispatcher.
- link: one per worker; relays its frames and notices its death (pidfd).
- one thread per file download, paced by the host's credit window.
Threads of the worker:
- main: runs the exec. User code must run on the main thread because only there can an
  interrupt reach it with SIGINT -> KeyboardInterrupt, which also breaks out of
  time.sleep() and other blocking calls.
- channel: reads the control process's frames (exec, interrupt, reseed).
- watchdog: turns interrupts into SIGINTs for the main thread, repeated every second.
- flusher: forwards captured output at least every few milliseconds.
- fd pump: forwards what child processes (and C code) write to fds 1 and 2.
"""

import argparse
import ast
import base64
import builtins
import codecs
import collections
import ctypes
import errno
import fcntl
import io
import json
import linecache
import os
import random
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
import types

VERSION = "1.1.0"
PROTOCOL = 1
PORT_NAME = "org.podflare.agent"
VIRTIO_PORTS = "/sys/class/virtio-ports"

MAGIC = b"PF\x01\x00"
PREAMBLE = 12  # magic + header_len + payload_len
MAX_HEADER = 64 << 10
MAX_PAYLOAD = 1 << 20
MAX_FRAME = PREAMBLE + MAX_HEADER + MAX_PAYLOAD
ID_LIMIT = 1 << 53

OUTPUT_FRAME = 64 << 10
DEFAULT_MAX_OUTPUT = 16 << 20
PENDING_OUTPUT_CAP = 1 << 20  # producers wait beyond this: memory stays bounded
FLUSH_DELAY = 0.005  # lets a burst of small writes coalesce into one frame
DRAIN_CAP = 4 << 20  # an endlessly writing child cannot stall the end of an exec
DRAIN_TIMEOUT = 5.0
DROP_BATCH_DELAY = 0.005
# Capture pipes: fewer wake-ups for a child that writes a lot. Pages are allocated only as
# data waits in the pipe (charged to the writer's cgroup); root may exceed pipe-max-size.
PIPE_SIZE = 4 << 20
_SPLICE_F_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
KICK_INTERVAL = 1.0  # SIGINT is repeated while code swallows KeyboardInterrupt
# How often a write that waits for room (PENDING_OUTPUT_CAP) looks for an interrupt that
# arrived meanwhile (it is deferred there: see ExecRunner._on_sigint).
INTERRUPT_POLL = 0.05
# The worker sends its output in writes of at most this much, so that its other frames
# (alive) are not held behind megabytes the host takes slowly.
SEND_BATCH = 1 << 20
# An interrupted exec whose worker shows no sign of life (its SIGINT handler never runs:
# stuck in C code, SIGINT blocked or ignored) for this long is ended by killing the worker.
KILL_GRACE = 10.0
DISCONNECTED_POLL = 0.02  # the port reads EOF (and polls HUP) until the host connects
SHUTDOWN_GRACE = 2.0

READ_CHUNK = 256 << 10
MIN_WINDOW, MAX_WINDOW = 64 << 10, 64 << 20
MAX_QUEUED_EXECS = 64
MAX_UPLOADS = 32
MAX_DOWNLOADS = 16
MAX_PATH = 4096
MAX_MESSAGE = 2000
MAX_TRACEBACK = 6000  # with MAX_MESSAGE, an exit header stays < 64 KiB at 6 bytes/char

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
HOSTNAME_RE = re.compile(r"[a-z0-9-]{1,63}")
MACHINE_ID_RE = re.compile(r"[0-9a-f]{32}")

# The guest's cgroup v2 tree (see Cgroups): <root>/agent holds the control process,
# <root>/user/exec-<n> the worker while it runs exec n (and, idle, before it: the worker
# waits for exec n there) and whatever that call starts, <root>/user/repl a worker
# starting up or stopping an interrupted exec.
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_CONTROLLERS = ("cpu", "memory", "pids")
PIDS_MAX = 1024  # tasks (threads count) of everything user code runs
# memory.max of `user` = MemTotal - reserve; the reserve is what the kernel (slab, page
# tables of the guest), init, the control agent and its page cache need. Measured in a
# 1 GiB guest: ~110 MiB outside `user` at rest; see docs/guest-isolation.md.
MEMORY_RESERVE_FRACTION = 0.125
MEMORY_RESERVE_MIN = 96 << 20
AGENT_MEMORY_MIN = 48 << 20  # never reclaimed from the control agent (it uses ~16 MiB)
AGENT_CPU_WEIGHT = 10000  # the maximum: the agent wins the CPU whenever it is runnable
USER_CPU_WEIGHT = 10  # default is 100; ratio 1000:1
SWEEP_PASSES = 20
PIDS_WATCH_INTERVAL = 0.2
SWEEP_INTERVAL = 0.1
WORKER_FD_ARG = "--fd"
WORKER_SEND_TIMEOUT = 5.0  # a worker that does not read its socket for this long is killed
RESPAWN_BACKOFF_MIN, RESPAWN_BACKOFF_MAX = 0.1, 5.0
QUICK_DEATH = 2.0  # a worker that dies this soon after starting backs the respawn off
MAX_WORKER_READ = 1 << 20
# mount(2) flags to keep when the cgroup2 mount is remounted with favordynmods.
_MS_REMOUNT = 32
_MOUNT_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "relatime": 1 << 21, "noatime": 1 << 10}
_CGROUP2_OPTIONS = {"nsdelegate", "memory_recursiveprot", "memory_localevents", "memory_hugetlb_accounting"}

_log_fd = 2  # main() points this at a dup of the original stderr (the console)
_log_prefix = "podflare-agent"


def log(message):
    try:
        os.write(_log_fd, f"{_log_prefix}: {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass


class RequestError(Exception):
    """A request the agent refuses; becomes an `error` reply with this protocol code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(header, key, lo, hi, nullable=False):
    value = header.get(key)
    if value is None and nullable:
        return None
    if not _is_int(value) or not lo <= value <= hi:
        raise RequestError("bad_request", f'"{key}" must be an integer in [{lo}, {hi}]' + (" or null" if nullable else ""))
    return value


def _str_field(header, key, pattern):
    value = header.get(key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise RequestError("bad_request", f'"{key}" must match {pattern.pattern}')
    return value


def _check_path(value):
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise RequestError("bad_path", '"path" must be an absolute path without NUL')
    try:
        encoded = os.fsencode(value)
    except UnicodeError:
        raise RequestError("bad_path", '"path" is not encodable') from None
    if len(encoded) > MAX_PATH:
        raise RequestError("bad_path", f'"path" is longer than {MAX_PATH} bytes')
    return value


def _clip(text, limit, keep_tail=False):
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if keep_tail else text[:limit] + "..."


def _safe_str(value):
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _utf8_cut(data, start, limit):
    """End index of at most `limit` bytes from `start` that does not split a character."""
    end = start + limit
    if end >= len(data):
        return len(data)
    while end > start and data[end] & 0xC0 == 0x80:
        end -= 1
    return end


def rand_pool_info(entropy):
    """struct rand_pool_info for RNDADDENTROPY: entropy_count (bits), buf_size, buf."""
    return struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy


class FrameParser:
    """Splits the incoming byte stream into frames and resynchronises on the magic.

    No I/O, so it is unit-testable; it holds at most one maximal frame.
    """

    def __init__(self):
        self._buf = bytearray()
        self._skipping = False  # inside a run of garbage that was reported already

    def room(self):
        return MAX_FRAME - len(self._buf)

    def reset(self):
        """Drops a partial frame: its sender went away."""
        self._buf.clear()
        self._skipping = False

    def feed(self, data):
        """Returns a list of ("frame", header_bytes, payload) and ("bad_frame", reason, None)."""
        events = []
        buf = self._buf
        buf += data
        while buf:
            if not buf.startswith(MAGIC):
                if MAGIC.startswith(buf):
                    break  # the beginning of a magic; wait for the rest
                if not self._skipping:
                    self._skipping = True
                    events.append(("bad_frame", "bad magic; resynchronising", None))
                start = buf.find(MAGIC, 1)
                if start < 0:
                    keep = next((k for k in (3, 2, 1) if buf.endswith(MAGIC[:k])), 0)
                    del buf[: len(buf) - keep]
                    break
                del buf[:start]
                continue
            if len(buf) < PREAMBLE:
                break
            header_len, payload_len = struct.unpack_from(">II", buf, 4)
            if not (2 <= header_len <= MAX_HEADER and payload_len <= MAX_PAYLOAD):
                # The lengths cannot be trusted, so neither can the frame's end.
                events.append(("bad_frame", f"frame lengths out of bounds (header {header_len}, payload {payload_len})", None))
                self._skipping = True
                del buf[:1]
                continue
            end = PREAMBLE + header_len + payload_len
            if len(buf) < end:
                break
            events.append(("frame", bytes(buf[PREAMBLE : PREAMBLE + header_len]), bytes(buf[PREAMBLE + header_len : end])))
            del buf[:end]
            self._skipping = False
        return events


class FrameWriter:
    """Writes frames; one lock keeps frames from concurrent senders whole."""

    def __init__(self, fd):
        self._fd = fd
        self._lock = threading.Lock()
        self._failing = False

    @staticmethod
    def encode(header, payload=b""):
        # ensure_ascii=False keeps text compact (<= 6 bytes a character in the worst case);
        # 'backslashreplace' writes a lone surrogate as \udcxx, which is its JSON escape.
        head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")
        if len(head) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
            raise ValueError(f"outgoing {header.get('type')} frame exceeds the protocol limits")
        return b"".join((MAGIC, struct.pack(">II", len(head), len(payload)), head, payload))

    def send(self, header, payload=b""):
        return self.send_encoded(self.encode(header, payload))

    def send_encoded(self, data):
        """Writes already-encoded frames in one go: under emulation every write to the
        port costs a device notification, so frames that leave together are joined."""
        with self._lock:
            try:
                _write_all(self._fd, data)
            except OSError as exc:
                if not self._failing:
                    log(f"cannot send to the host: {exc}")
                self._failing = True
                return False
            self._failing = False
        return True


def _set_affinity(cpus):
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, ValueError):
        pass


def _pin_helper_thread():
    """Keeps the agent's helper threads on one vCPU. Under TCG, waking a thread on
    another (halted) vCPU costs milliseconds; user code on the main thread, and every
    process or thread it starts, keeps all CPUs."""
    _set_affinity({min(os.sched_getaffinity(0))})


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


class ExecJob:
    __slots__ = ("id", "language", "code", "timeout", "max_output", "deadline", "reason", "next_kick", "raises_seen")

    def __init__(self, job_id, language, code, timeout, max_output):
        self.id = job_id
        self.language = language
        self.code = code
        self.timeout = timeout  # seconds or None
        self.max_output = max_output
        self.deadline = None
        self.reason = None  # None, "timeout" or "cancel": why the exec is being interrupted
        self.next_kick = 0.0
        self.raises_seen = 0


_worker_pid = None  # set in the worker; a process with another pid is a fork of it
_interrupt_pending = False  # the running exec is being interrupted: its forks die at birth


def _in_forked_child():
    return _worker_pid is not None and os.getpid() != _worker_pid


def _exit_forked(exc):
    """A process that user code forked (os.fork, multiprocessing with fork) and that came
    back out of the cell: it must not act as the REPL (send an exit frame, wait for the
    next exec), so it leaves with the cell's status, as a script would."""
    code = 0
    if isinstance(exc, SystemExit):
        code = exc.code if _is_int(exc.code) else (0 if exc.code is None else 1)
    elif exc is not None:
        code = 1
        try:
            text = "".join(traceback.format_exception(type(exc), exc, _without_agent_frames(exc.__traceback__)))
            _write_all(2, text.encode("utf-8", "replace"))
        except Exception:
            pass
    os._exit(code & 0xFF)


def _compile_cell(source, filename):
    """Compiles a cell; a trailing expression is compiled apart so its value can be shown."""
    tree = ast.parse(source, filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval", dont_inherit=True)
    return compile(tree, filename, "exec", dont_inherit=True), last


def _without_agent_frames(tb):
    """Relinks a traceback without the agent's frames (the cell's caller, _on_sigint, ...)."""
    kept = []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename != __file__:
            kept.append(tb)
        tb = tb.tb_next
    for outer, inner in zip(kept, kept[1:]):
        outer.tb_next = inner
    if kept:
        kept[-1].tb_next = None
    return kept[0] if kept else None


def _error_info(exc, text):
    # Clipped so that the exit header stays within MAX_HEADER whatever the exception.
    return {
        "name": _clip(type(exc).__name__, 200),
        "value": _clip(_safe_str(exc), MAX_MESSAGE),
        "traceback": _clip(text, MAX_TRACEBACK, keep_tail=True),
    }


class _ExecQueue:
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


class ExecRunner(_ExecQueue):
    """The REPL: runs execs one at a time on the main thread; owns the queue and timeouts."""

    def __init__(self, writer, collector, capture):
        super().__init__()
        self._writer = writer
        self._collector = collector
        self._capture = capture
        self._armed = False  # user code is on the main thread's stack right now
        self._raises = 0  # KeyboardInterrupts raised: proof that the interrupted code runs Python
        # A SIGINT for the running exec arrived while the agent's own code (a write) ran on
        # the main thread: raised at the next safe point (interrupt_point) instead.
        self._deferred = False
        collector.interrupted = self._interrupt_deferred
        self._main_ident = threading.get_ident()
        self._idle_cpus = None
        self._cells = 0
        # A real module, so pickle, dataclasses and typing find cell-defined names in
        # sys.modules["__main__"].
        self._main_module = types.ModuleType("__main__")
        self._main_module.__builtins__ = builtins
        self._globals = self._main_module.__dict__
        self.stopped = threading.Event()

    def install(self):
        """Takes over __main__ and SIGINT; call on the main thread."""
        sys.modules["__main__"] = self._main_module
        signal.signal(signal.SIGINT, self._on_sigint)
        threading.Thread(target=self._watch, name="podflare-watchdog", daemon=True).start()

    def interrupt(self, target, reason):
        """Interrupts exec `target` (`reason`: "timeout" or "cancel") if it is queued or running."""
        global _interrupt_pending
        with self._cond:
            for job in [self._current, *self._queue]:
                if job is not None and job.id == target and job.reason is None:
                    job.reason = reason
                    _interrupt_pending = job is self._current
                    self._cond.notify_all()

    def run_forever(self):
        try:
            all_cpus = os.sched_getaffinity(0)
            idle_cpus = self._idle_cpus = {min(all_cpus)}
            while True:
                with self._cond:
                    if not self._queue and not self._closing:
                        # Wait on the helpers' vCPU, so the reader's wake-up is not an
                        # inter-processor interrupt (milliseconds under TCG) ...
                        _set_affinity(idle_cpus)
                        while not self._queue and not self._closing:
                            self._cond.wait()
                    # ... and run user code with every CPU: the processes and threads it
                    # starts inherit this mask. Also when the next exec was already
                    # queued: _run pinned this thread for the previous exit frame.
                    _set_affinity(all_cpus)
                    if self._closing:
                        return
                    job = self._queue.popleft()
                    job.deadline = None if job.timeout is None else time.monotonic() + job.timeout
                    self._current = job
                    # Wake the watchdog only when it has something to time: under
                    # emulation every needless wake-up costs the exec a GIL hand-off.
                    if job.deadline is not None or job.reason is not None:
                        self._cond.notify_all()
                try:
                    self._run(job)
                except Exception:  # an agent bug; the REPL must survive it
                    log(f"exec {job.id}: {traceback.format_exc()}")
        finally:
            self.stopped.set()

    def _run(self, job):
        global _interrupt_pending
        _interrupt_pending = job.reason is not None
        self._collector.begin(job.id, job.max_output)
        try:
            result = self._run_python(job) if job.language == "python" else self._run_bash(job)
        except Exception as exc:  # an agent bug: the exec still ends with exactly one exit
            log(f"exec {job.id}: {traceback.format_exc()}")
            result = {"code": 1, "error": _error_info(exc, "")}
        if job.reason is not None:
            # The interrupt took: the user code on the main thread has stopped. What is left
            # is the agent sending the exec's last output, which takes as long as the host
            # takes it: while it moves, the control process must not kill the REPL as stuck.
            self._collector.ending = job.id
        for stream in (sys.stdout, sys.stderr):  # user code may have installed buffered ones
            try:
                stream.flush()
            except Exception:
                pass
        self._capture.drain()
        with self._cond:
            self._current = None
            if job.deadline is not None or job.reason is not None:
                self._cond.notify_all()
        frame = {"type": "exit", "id": job.id, **result}
        if job.reason == "timeout":
            frame.update(code=124, timed_out=True)
        elif job.reason == "cancel":
            frame.update(code=130, cancelled=True)
        if self._idle_cpus is not None:
            # Back on the helpers' vCPU before the exit frame leaves (the reader of a
            # split agent is woken there without an inter-processor interrupt), and
            # before the idle worker is moved to its next cgroup (the kernel calls each
            # thread's last CPU for that).
            _set_affinity(self._idle_cpus)
        self._collector.flush(final=True, exit_frame=frame)

    def _run_python(self, job):
        self._cells += 1
        filename = f"<cell-{self._cells}>"
        # mtime None: linecache.checkcache() keeps the entry, so tracebacks show source.
        linecache.cache[filename] = (len(job.code), None, job.code.splitlines(True), filename)
        try:
            body, last = _compile_cell(job.code, filename)
        except Exception as exc:  # SyntaxError and the like: no traceback, as in the REPL
            return self._report(exc, exc_traceback=None)
        # Re-installed each time: user code may have replaced the handler, and timeouts
        # must keep working.
        signal.signal(signal.SIGINT, self._on_sigint)
        exc = self._call_armed(job, body, last)
        if _in_forked_child():
            _exit_forked(exc)
        if exc is None:
            return {"code": 0}
        self._capture.drain()  # what children printed comes before the traceback
        if isinstance(exc, SystemExit):
            if exc.code is None:
                return {"code": 0}
            if isinstance(exc.code, int):
                return {"code": int(exc.code)}
            self._collector.push("stderr", _safe_str(exc.code) + "\n")
            return {"code": 1}
        return self._report(exc, _without_agent_frames(exc.__traceback__))

    def _call_armed(self, job, body, last):
        """Runs the cell; returns the exception that ended it, or None.

        _on_sigint raises only while _armed is set and never in this frame itself, so a
        KeyboardInterrupt always starts below the try and can never escape from here.
        """
        self._deferred = False  # one deferred for an earlier exec is void
        try:
            self._armed = True
            try:
                if job.reason is not None:
                    # Timed out or cancelled before the code started; the SIGINT for
                    # that was ignored, and the next one is up to a second away.
                    raise KeyboardInterrupt
                exec(body, self._globals)
                if last is not None:
                    value = eval(last, self._globals)
                    if value is not None:
                        self._globals["_"] = value
                        self._capture.drain()  # `subprocess.run(...)`: its output first
                        print(repr(value))
            finally:
                self._armed = False
        except BaseException as exc:
            return exc
        return None

    def _report(self, exc, exc_traceback):
        exc.__traceback__ = exc_traceback
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc_traceback  # for pdb.pm()
        text = "".join(traceback.format_exception(type(exc), exc, exc_traceback))
        # Straight to the host: the cell may have redirected sys.stderr.
        self._collector.push("stderr", text)
        return {"code": 1, "error": _error_info(exc, text)}

    def _run_bash(self, job):
        try:
            # stdout/stderr are inherited: fds 1/2 are the capture pipes, which also keep
            # background jobs that outlive this call from dying of SIGPIPE. The cwd is
            # inherited too (equal to os.getcwd(), and valid even if it was deleted).
            proc = subprocess.Popen(["bash", "-c", job.code], stdin=subprocess.DEVNULL, env=dict(os.environ), start_new_session=True)
        except OSError as exc:
            self._collector.push("stderr", f"podflare: cannot start bash: {exc}\n")
            return {"code": 127}
        killed = False
        while True:
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            if job.reason is not None and not killed:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed = True
        code = proc.returncode
        return {"code": code if code >= 0 else 128 - code}

    def _on_sigint(self, signum, frame):
        # Only an interrupt meant for the exec running right now may raise: a late signal
        # for an exec that already ended is ignored, and so is one that would land in
        # _call_armed's own bookkeeping (the watchdog repeats it a second later).
        job = self._current
        if self._armed and job is not None and job.reason is not None and frame is not None and frame.f_code is not _CALL_ARMED_CODE:
            if _in_agent_code(frame):
                # The cell called into the agent (sys.stdout.write): an exception raised
                # here could leave the collector's lock taken (inside Condition.__enter__)
                # or its bookkeeping half done. It is raised once that code is done.
                self._deferred = True
                return
            self._raises += 1
            raise KeyboardInterrupt

    def _interrupt_deferred(self):
        return self._deferred and self._armed and threading.get_ident() == self._main_ident

    def interrupt_point(self):
        """Raises the KeyboardInterrupt that _on_sigint deferred, if any (a safe point of
        the agent's code that user code called: nothing is held or half updated here)."""
        if self._interrupt_deferred():
            self._deferred = False
            job = self._current
            if job is not None and job.reason is not None:
                self._raises += 1
                raise KeyboardInterrupt

    def _watch(self):
        _pin_helper_thread()
        with self._cond:
            while True:
                job = self._current
                now = time.monotonic()
                if job is not None and job.reason is None and job.deadline is not None and now >= job.deadline:
                    job.reason = "timeout"
                if job is None or job.reason is None:
                    self._cond.wait(None if job is None or job.deadline is None else job.deadline - now)
                elif job.language != "python":
                    self._cond.wait()  # the bash loop polls job.reason itself
                else:
                    if now >= job.next_kick:
                        job.next_kick = now + KICK_INTERVAL
                        if self._raises != job.raises_seen:
                            # The code swallows KeyboardInterrupt but does run: the
                            # control process must not take it for stuck (KILL_GRACE).
                            job.raises_seen = self._raises
                            self._writer.send({"type": "alive", "id": job.id})
                        signal.pthread_kill(self._main_ident, signal.SIGINT)
                    self._cond.wait(job.next_kick - now)


_CALL_ARMED_CODE = ExecRunner._call_armed.__code__


def _in_agent_code(frame):
    """True if `frame`, or a caller of it below the cell's caller (_call_armed), is the
    agent's own code: user code called into the agent, which is running there now."""
    while frame is not None and frame.f_code is not _CALL_ARMED_CODE:
        if frame.f_code.co_filename == __file__:
            return True
        frame = frame.f_back
    return False


class WorkerChannel:
    """The worker's end of the socket pair: exec, interrupt and reseed requests from the
    control process (trusted: it validated everything the host sent)."""

    def __init__(self, fd, writer, runner):
        self._fd = fd
        self._writer = writer
        self._runner = runner

    def read_loop(self):
        _pin_helper_thread()
        parser = FrameParser()
        while True:
            try:
                data = os.read(self._fd, min(parser.room(), 1 << 20))
            except OSError as exc:
                log(f"worker: channel read failed: {exc}")
                break
            if not data:
                break
            for kind, first, payload in parser.feed(data):
                if kind != "frame":
                    log(f"worker: {first}")
                    continue
                try:
                    self._dispatch(json.loads(first), payload)
                except Exception:
                    log(f"worker: {traceback.format_exc()}")
        # The control process is gone (it exits, or killed us and we are about to die).
        self._runner.shutdown()
        if not self._runner.stopped.wait(SHUTDOWN_GRACE):
            os._exit(0)

    def _dispatch(self, header, payload):
        kind = header.get("type")
        if kind == "exec":
            code = payload.decode("utf-8")
            job = ExecJob(header["id"], header["language"], code, None, header["max_output_bytes"])
            if not self._runner.submit(job):
                self._writer.send({"type": "exit", "id": job.id, "code": 1})
        elif kind == "interrupt":
            self._runner.interrupt(header["id"], header["reason"])
        elif kind == "reseed":
            # The control process has just reseeded the kernel CRNG (restore): clones of
            # one snapshot must stop sharing the REPL's random sequence. The module object
            # is the one user code imported.
            random.seed(os.urandom(32))
            self._writer.send({"type": "reseeded", "id": header.get("id")})


def _after_fork_in_worker(channel_fd, null_fd):
    if _interrupt_pending:
        # Forked after the call was interrupted: outside the call's cgroup (the worker has
        # left it), where a fork loop would otherwise go on until its KeyboardInterrupt.
        os._exit(1)
    # A fork of the worker must not write frames into the worker's channel (its copy of
    # the writer's lock may even be held): the channel becomes /dev/null. Forked copies
    # are also the preferred victims of the OOM killer, ahead of the REPL.
    try:
        os.dup2(null_fd, channel_fd, inheritable=False)
    except OSError:
        pass
    _write_proc_file("/proc/self/oom_score_adj", "500")


def _write_proc_file(path, text):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, text.encode("ascii"))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def worker_main(args):
    """The REPL worker: runs user code; talks only to the control process (fd `args.fd`)."""
    global _worker_pid, _log_prefix
    _log_prefix = "podflare-agent[worker]"
    _worker_pid = os.getpid()
    fd = args.fd
    os.set_inheritable(fd, False)  # user code's children must not reach the channel
    if args.cpus:
        # Spawned from a control thread that stays on one vCPU; user code gets them all.
        _set_affinity({int(cpu) for cpu in args.cpus.split(",")})
    _write_proc_file("/proc/self/oom_score_adj", "0")  # the control process has -1000
    null_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    os.register_at_fork(after_in_child=lambda: _after_fork_in_worker(fd, null_fd))
    writer = FrameWriter(fd)
    collector = OutputCollector(writer)
    capture = FdCapture(collector)
    runner = ExecRunner(writer, collector, capture)
    sys.stdout = CapturedStream(collector, "stdout", 1, runner.interrupt_point)
    sys.stderr = CapturedStream(collector, "stderr", 2, runner.interrupt_point)
    sys.argv = [""]
    if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
        sys.path[0] = ""  # as in the interactive interpreter: imports see the cwd
    runner.install()
    collector.start()
    capture.start()
    writer.send({"type": "ready", "id": None, "pid": os.getpid()})
    threading.Thread(target=WorkerChannel(fd, writer, runner).read_loop, name="podflare-channel", daemon=True).start()
    runner.run_forever()
    os._exit(0)  # user threads may still run and must not keep the process alive


def _read_text(path):
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def memory_limit_for(mem_total):
    """memory.max of the `user` subtree for a guest whose MemTotal is `mem_total` bytes."""
    reserve = max(MEMORY_RESERVE_MIN, int(mem_total * MEMORY_RESERVE_FRACTION))
    return max(mem_total - reserve, mem_total // 2) // 4096 * 4096


class Cgroups:
    """The guest's cgroup v2 layout, managed by the control process:

        <root>/agent           the control process: cpu.weight 10000, memory.min
        <root>/user            everything user code runs: memory.max, pids.max, cpu.weight 10
        <root>/user/repl       a new worker until it is ready, and the worker while an
                               interrupted exec stops
        <root>/user/exec-<n>   the worker while it runs exec n, and every process that
                               call starts; removed once empty. The idle worker already
                               waits in the next one (see ExecScheduler._park).

    `user` enables no controllers for its children: its limits cover the whole subtree,
    and its children are plain process groups (cheap to create and remove per exec) that
    cgroup.kill can end at once. With `root` None every operation is a no-op (tests on a
    host, or a kernel without cgroup v2). Failures are logged, never fatal.
    """

    def __init__(self, root):
        self.root = root
        self.enabled = root is not None
        self.agent = self.user = self.repl = None
        if self.enabled:
            self.agent = os.path.join(root, "agent")
            self.user = os.path.join(root, "user")
            self.repl = os.path.join(self.user, "repl")
        self.memory_max = None
        self._seq = 0
        self._lingering = []  # exec cgroups that still had processes when their exec ended
        self._counter_fds = {}  # event file -> fd kept open: one pread per exec, not open+read+close

    def _write(self, path, text, quiet=False):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode("ascii"))  # one write: cgroup files take one value each
            finally:
                os.close(fd)
            return True
        except OSError as exc:
            if not quiet:
                log(f"cgroup: write {text!r} to {path}: {exc}")
            return False

    def favor_dynmods(self):
        """Remounts the guest's cgroup2 with `favordynmods` (Linux 6.0+). Without it every
        move of a process between cgroups waits for an RCU grace period (synchronize_rcu
        in percpu_down_write of cgroup_threadgroup_rwsem), which a 2-vCPU guest under TCG
        takes 1 to 20 ms to finish; with it forks and exits take a slower (atomic) path
        instead. Only for the guest's own mount (the root of a cgroup2 file system)."""
        if not self.enabled or not os.path.ismount(self.root):
            return
        options = set()
        for line in _read_text("/proc/mounts").splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[1] == self.root and fields[2] == "cgroup2":
                options = set(fields[3].split(","))
        if not options or "favordynmods" in options:
            return
        flags = _MS_REMOUNT | sum(flag for name, flag in _MOUNT_FLAGS.items() if name in options)
        data = ",".join(["favordynmods", *sorted(options & _CGROUP2_OPTIONS)])
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"cgroup2", os.fsencode(self.root), b"cgroup2", ctypes.c_ulong(flags), data.encode()) != 0:
            log(f"cgroup: remount {self.root} with favordynmods: {os.strerror(ctypes.get_errno())}")

    def setup(self):
        """Creates the layout, sets the limits and moves this (control) process into agent/."""
        if not self.enabled:
            return
        available = _read_text(os.path.join(self.root, "cgroup.controllers")).split()
        for controller in CGROUP_CONTROLLERS:
            if controller in available:
                self._write(os.path.join(self.root, "cgroup.subtree_control"), f"+{controller}")
            else:
                log(f"cgroup: controller {controller} not available (have: {' '.join(available) or 'none'})")
        for path in (self.agent, self.user, self.repl):
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                log(f"cgroup: mkdir {path}: {exc}; running without cgroups")
                self.enabled = False
                return
        mem_total = 0
        for line in _read_text("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):  # "MemTotal:       995500 kB"
                mem_total = int(line.split()[1]) * 1024
        limits = [
            (self.agent, "cpu.weight", AGENT_CPU_WEIGHT),
            (self.agent, "memory.min", AGENT_MEMORY_MIN),
            (self.user, "cpu.weight", USER_CPU_WEIGHT),
            (self.user, "pids.max", PIDS_MAX),
        ]
        if mem_total:
            self.memory_max = memory_limit_for(mem_total)
            limits.append((self.user, "memory.max", self.memory_max))
        for path, name, value in limits:
            if os.path.exists(os.path.join(path, name)):
                self._write(os.path.join(path, name), str(value))
        # An earlier control process died: its worker (and the worker's own children) are
        # of no use to anyone now. Processes of earlier execs keep running.
        self.kill(self.repl)
        for entry in self._exec_cgroups():
            self._seq = max(self._seq, int(entry[5:]))
            self._lingering.append(os.path.join(self.user, entry))
        self.tidy()
        if not self._write(os.path.join(self.agent, "cgroup.procs"), "0"):
            log("cgroup: cannot move the agent into its cgroup; running without cgroups")
            self.enabled = False
            return
        _write_proc_file("/proc/self/oom_score_adj", "-1000")
        log(f"cgroups: user memory.max={self.memory_max} pids.max={PIDS_MAX}")

    def _exec_cgroups(self):
        try:
            return [e for e in os.listdir(self.user) if e.startswith("exec-") and e[5:].isdigit()]
        except OSError:
            return []

    def spawn_prefix(self):
        """argv prefix that starts a process in user/repl before it runs anything: its
        start-up memory is then charged to `user` (a shell builtin moves the shell itself,
        which then becomes the worker)."""
        if not self.enabled:
            return []
        return ["/bin/sh", "-c", 'echo 0 > "$0"; exec "$@"', os.path.join(self.repl, "cgroup.procs")]

    def new_exec(self):
        if not self.enabled:
            return None
        self._seq += 1
        path = os.path.join(self.user, f"exec-{self._seq}")
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError as exc:
            log(f"cgroup: mkdir {path}: {exc}")
            return None
        return path

    def move(self, pid, path):
        return self.enabled and path is not None and self._write(os.path.join(path, "cgroup.procs"), str(pid), quiet=True)

    def procs(self, path):
        return {int(pid) for pid in _read_text(os.path.join(path, "cgroup.procs")).split() if pid.isdigit()}

    def kill(self, path):
        """SIGKILLs every process in `path` (cgroup.kill: also those forking meanwhile)."""
        if not self.enabled or path is None or not os.path.isdir(path):
            return
        if self._write(os.path.join(path, "cgroup.kill"), "1", quiet=True):
            return
        for _ in range(SWEEP_PASSES):  # a kernel before 5.14: one by one
            pids = self.procs(path)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def remove(self, path):
        """rmdir once empty; a cgroup that still has processes is retried by tidy()."""
        if not self.enabled or path is None:
            return
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            if path not in self._lingering:
                self._lingering.append(path)

    def remove_later(self, path):
        if self.enabled and path is not None and path not in self._lingering:
            self._lingering.append(path)

    def tidy(self):
        lingering, self._lingering = self._lingering, []
        for path in lingering:
            self.remove(path)

    def exec_cgroups(self):
        return [os.path.join(self.user, entry) for entry in self._exec_cgroups()] if self.enabled else []

    def _counter(self, name, key):
        """A counter of user/<name>, read through an fd kept open (on the exec path)."""
        if not self.enabled:
            return 0
        fd = self._counter_fds.get(name)
        if fd is None:
            try:
                fd = os.open(os.path.join(self.user, name), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return 0
            kept = self._counter_fds.setdefault(name, fd)  # read from more than one thread
            if kept != fd:
                os.close(fd)
                fd = kept
        try:
            text = os.pread(fd, 4096, 0).decode("ascii", "replace")
        except OSError:
            return 0
        for line in text.splitlines():
            field, _, value = line.partition(" ")
            if field == key and value.strip().isdigit():
                return int(value)
        return 0

    def oom_kills(self):
        return self._counter("memory.events", "oom_kill")

    def pids_limit_hits(self):
        return self._counter("pids.events", "max")

    def watch_pids_limit(self, on_hit):
        """Calls on_hit() (at most every PIDS_WATCH_INTERVAL) whenever forks in `user`
        fail for its pids.max, from a thread woken by the kernel (poll on pids.events)."""
        path = os.path.join(self.user, "pids.events") if self.enabled else None
        if path is None or not os.path.exists(path):
            return
        threading.Thread(target=self._pids_watch, args=(path, on_hit), name="podflare-pids", daemon=True).start()

    def _pids_watch(self, path, on_hit):
        _pin_helper_thread()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            poller = select.poll()
            poller.register(fd, select.POLLPRI)
            last = None
            while True:
                # Reading re-arms the notification; a change makes poll() return POLLPRI.
                count = 0
                for line in os.pread(fd, 4096, 0).decode("ascii", "replace").splitlines():
                    if line.startswith("max ") and line[4:].strip().isdigit():
                        count = int(line[4:])
                if last is not None and count > last:
                    on_hit()
                    time.sleep(PIDS_WATCH_INTERVAL)  # a rate limit: a bomb fails thousands of forks a second
                last = count
                poller.poll()
        except Exception:
            log(f"pids watcher: {traceback.format_exc()}")


class WorkerProcess:
    """One REPL worker: the process, its socket and its link thread."""

    def __init__(self, argv, on_frames, on_death):
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.set_inheritable(child.fileno(), True)
            self.pid = os.posix_spawn(
                argv[0],
                [*argv, WORKER_FD_ARG, str(child.fileno())],
                dict(os.environ),
                # User code expects default signal dispositions (this process may ignore some).
                setsigdef=signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP},
            )
        except BaseException:
            host.close()
            raise
        finally:
            child.close()
        self._sock = host
        self._fd = host.fileno()
        os.set_blocking(self._fd, False)
        self._pidfd = os.pidfd_open(self.pid)
        self._send_lock = threading.Lock()  # also keeps _fd from closing under a sender
        self._pid_lock = threading.Lock()  # keeps _pidfd from closing under kill()
        self._on_frames = on_frames
        self._on_death = on_death
        self.started = time.monotonic()
        self.ready_at = None  # set (under the scheduler's lock) by its "ready" frame
        self.dead = False
        self.gone = threading.Event()  # reaped

    def start(self):
        threading.Thread(target=self._link, name=f"podflare-link-{self.pid}", daemon=True).start()

    def send(self, header, payload=b"", timeout=WORKER_SEND_TIMEOUT):
        """Sends a frame without ever blocking for long: a worker that does not read its
        socket (stuck, or user code stole the fd) is killed instead."""
        data = FrameWriter.encode(header, payload)
        deadline = time.monotonic() + timeout
        with self._send_lock:
            if self._fd < 0:
                return False  # closed: the number may belong to another file by now
            view = memoryview(data)
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            while view:
                try:
                    view = view[os.write(self._fd, view) :]
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                poller.poll(remaining * 1000)
        if view:
            log(f"worker {self.pid} does not take frames; killing it")
            self.kill()
            return False
        return True

    def kill(self):
        with self._pid_lock:
            if self._pidfd >= 0:  # a pidfd never signals a recycled pid
                try:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                except OSError:
                    pass

    def close_channel(self):
        """Tells the worker to exit (EOF on its channel)."""
        with self._send_lock:
            if self._fd >= 0:
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _link(self):
        _pin_helper_thread()
        parser = FrameParser()
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._pidfd, select.POLLIN)
        eof = False
        try:
            while True:
                ready = dict(poller.poll())
                if not eof and ready.get(self._fd):
                    eof = not self._relay(parser)
                    if eof:
                        poller.unregister(self._fd)
                        # User code may have shut the socket: a worker that cannot talk is useless.
                        self.kill()
                if ready.get(self._pidfd):
                    break
            while not eof and self._relay(parser):  # what it sent before it died
                pass
        except Exception:
            log(f"worker link: {traceback.format_exc()}")
            self.kill()
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 0
        with self._send_lock, self._pid_lock:
            self._sock.close()
            os.close(self._pidfd)
            self._fd = self._pidfd = -1
        try:
            self._on_death(self, status)
        finally:
            self.gone.set()

    def _relay(self, parser):
        """Reads what is there; False on EOF (or once nothing is left after death)."""
        try:
            data = os.read(self._fd, min(parser.room(), MAX_WORKER_READ))
        except BlockingIOError:
            return not self.dead_reading_done()
        except OSError:
            return False
        if not data:
            return False
        frames = []
        for kind, first, payload in parser.feed(data):
            if kind == "frame":
                frames.append((first, payload))
            else:
                log(f"worker {self.pid} sent a bad frame ({first})")
        if frames:
            self._on_frames(self, frames)
        return True

    def dead_reading_done(self):
        # Nothing more to read right now: after the worker's death that is the end of it.
        try:
            return select.select([self._pidfd], [], [], 0)[0] != []
        except (OSError, ValueError):
            return True


def _death_cause(status):
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}", 128 - code
    return f"exited with code {code}", code or 1


class ControlJob:
    __slots__ = (
        "id", "language", "code", "timeout", "max_output", "room", "truncated", "reason", "deadline",
        "interrupted_at", "kill_at", "done", "worker", "cgroup", "oom_before", "pids_before",
        "repl_before", "kill_leftovers", "killed_stuck", "ending",
    )

    def __init__(self, job_id, language, code, timeout, max_output):
        self.id = job_id
        self.language = language
        self.code = code  # the payload bytes, already checked to be UTF-8
        self.timeout = timeout
        self.max_output = max_output
        self.room = max_output
        self.truncated = False
        self.reason = None  # "timeout" or "cancel"
        self.deadline = None
        self.interrupted_at = None
        self.kill_at = None  # the worker is killed if still running then (KILL_GRACE)
        self.done = False  # its exit frame was sent
        self.worker = None
        self.cgroup = None
        self.oom_before = self.pids_before = 0
        self.repl_before = set()
        self.kill_leftovers = False
        self.killed_stuck = False
        self.ending = False  # the worker says the interrupt took; its last output is leaving


class ExecScheduler(_ExecQueue):
    """Runs execs one at a time on the REPL worker (the dispatcher is the main thread):
    owns the queue, timeouts, cancels, per-exec cgroups and the worker's life."""

    def __init__(self, writer, cgroups, worker_argv, kill_grace=KILL_GRACE):
        super().__init__()
        self._writer = writer
        self._cgroups = cgroups
        self._worker_argv = worker_argv
        self._kill_grace = kill_grace
        self._worker = None
        self._respawn_at = 0.0
        self._backoff = RESPAWN_BACKOFF_MIN
        self._restart_note = None  # told (stderr) to the next exec: the REPL died while idle
        # The exec cgroup the idle worker already sits in (dispatcher thread only): moving a
        # process between cgroups costs milliseconds under TCG (1 to 5 ms p50 measured), so
        # it is done once per exec, after the exit frame, instead of twice on the exec's path.
        self._parked = None  # (worker, cgroup)
        self.stopped = threading.Event()

    # -- called from the reader thread --

    def cancel(self, target):
        """Removes and returns exec `target` if queued; interrupts it if running."""
        with self._cond:
            for job in self._queue:
                if job.id == target:
                    self._queue.remove(job)
                    return job
            job = self._current
            if job is not None and job.id == target and job.reason is None and not job.done:
                job.reason = "cancel"
                self._cond.notify_all()
        return None

    def reseed(self):
        """After a restore: the REPL reseeds `random` before it runs anything else (its
        channel is in order). No worker: the next one seeds itself from the fresh CRNG."""
        with self._cond:
            worker = self._worker
        if worker is not None and not worker.dead:
            worker.send({"type": "reseed", "id": None}, timeout=1.0)

    def _busiest_is(self, path):
        """True if cgroup `path` holds more processes than any other exec cgroup: the
        call that hit the pids limit, rather than one running beside a background bomb."""
        if path is None:
            return False
        cg = self._cgroups
        mine = len(cg.procs(path))
        return mine > 0 and all(len(cg.procs(other)) < mine for other in cg.exec_cgroups() if other != path)

    def pids_limit_hit(self):
        """Forks fail for the pids limit: if processes that an earlier call left behind
        outnumber the running call's (a fork bomb put in the background, say
        `:(){ :|:& };:`, which returns at once), they are killed. A running call that
        bombs is the caller's to time out or cancel, and its leftovers die as it ends."""
        cg = self._cgroups
        with self._cond:
            current = self._current.cgroup if self._current is not None else None
        parked = self._parked  # holds the idle worker: never a candidate
        sizes = {path: len(cg.procs(path)) for path in cg.exec_cgroups()}
        busiest = max((path for path in sizes if path != current and (parked is None or path != parked[1])), key=sizes.get, default=None)
        if busiest is not None and sizes[busiest] > sizes.get(current, 0):
            log(f"pids limit hit: killing {sizes[busiest]} processes left behind in {busiest}")
            cg.kill(busiest)
            cg.remove(busiest)

    # -- the dispatcher (main thread) --

    def run_forever(self):
        _pin_helper_thread()
        try:
            while True:
                job = self._next_job()
                if job is None:
                    return
                try:
                    self._run(job)
                except Exception:  # an agent bug: the exec still ends with exactly one exit
                    log(f"exec {job.id}: {traceback.format_exc()}")
                    job.worker.kill()
                    self._wait_done(job)
                finally:
                    with self._cond:
                        self._current = None
        finally:
            self._stop_worker()
            self.stopped.set()

    def _next_job(self):
        while True:
            park = None
            with self._cond:
                while True:
                    if self._closing:
                        return None
                    worker = self._worker
                    if worker is None:
                        delay = self._respawn_at - time.monotonic()
                        if delay <= 0:
                            break
                        self._cond.wait(delay)
                    elif worker.ready_at is not None and self._queue:
                        job = self._queue.popleft()
                        job.worker = worker
                        self._current = job
                        return job
                    elif worker.ready_at is not None and self._cgroups.enabled and (self._parked is None or self._parked[0] is not worker):
                        park = worker  # a new worker: into its first exec cgroup before any exec
                        break
                    else:
                        self._cond.wait()
            if park is not None:
                self._park(park)
            else:
                self._spawn()

    def _park(self, worker):
        """Moves the idle worker into a fresh exec cgroup, where the next exec will run
        (falls back to user/repl, and a move on the exec's path, if that fails)."""
        cg = self._cgroups
        path = None if worker.dead else cg.new_exec()
        if path is not None and cg.move(worker.pid, path):
            self._parked = (worker, path)
            return
        if path is not None:
            cg.remove(path)
        if not worker.dead:
            cg.move(worker.pid, cg.repl)
        self._parked = (worker, None)  # no retry until the next exec ends

    def _spawn(self):
        cg = self._cgroups
        cg.kill(cg.repl)  # what the previous worker left behind (it is gone by now)
        if self._parked is not None:
            _, parked = self._parked
            self._parked = None
            if parked is not None:  # ... idle in its parked cgroup, too
                cg.kill(parked)
                cg.remove(parked)
        try:
            worker = WorkerProcess(cg.spawn_prefix() + self._worker_argv, self._from_worker, self._worker_died)
        except OSError as exc:
            log(f"cannot start the REPL worker: {exc}")
            with self._cond:
                self._respawn_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, RESPAWN_BACKOFF_MAX)
            return
        cg.move(worker.pid, cg.repl)  # the shell prefix did it already; harmless
        with self._cond:
            self._worker = worker
        worker.start()
        log(f"REPL worker started pid={worker.pid}")

    def _run(self, job):
        cg = self._cgroups
        worker = job.worker
        job.oom_before = cg.oom_kills()
        job.pids_before = cg.pids_limit_hits()
        parked, self._parked = self._parked, None
        if parked is not None and parked[0] is worker and parked[1] is not None:
            job.cgroup = parked[1]  # the worker is in it already
        else:
            job.cgroup = cg.new_exec()
            if job.cgroup is not None and not cg.move(worker.pid, job.cgroup):
                cg.remove(job.cgroup)
                job.cgroup = None
        note = None
        with self._cond:
            note, self._restart_note = self._restart_note, None
            job.deadline = None if job.timeout is None else time.monotonic() + job.timeout
        if note:
            self._send_output(job, "stderr", note.encode())
        header = {"type": "exec", "id": job.id, "language": job.language, "max_output_bytes": job.max_output}
        worker.send(header, job.code)  # on failure the worker is killed: the death ends the job
        self._supervise(job)
        self._finish(job)

    def _supervise(self, job):
        while True:
            act = None
            with self._cond:
                if job.done:
                    return
                now = time.monotonic()
                if job.reason is None and job.deadline is not None and now >= job.deadline:
                    job.reason = "timeout"
                if job.reason is not None and job.interrupted_at is None:
                    job.interrupted_at = now
                    job.kill_at = now + self._kill_grace
                    act = "interrupt"
                elif job.kill_at is not None and now >= job.kill_at:
                    job.kill_at = None
                    job.killed_stuck = True
                    act = "kill"
                elif job.interrupted_at is not None and job.cgroup is not None:
                    # Until the code stops, what it forks outside the call's cgroup is
                    # killed every SWEEP_INTERVAL (a fork loop must not starve it).
                    self._cond.wait(SWEEP_INTERVAL if job.kill_at is None else min(SWEEP_INTERVAL, max(0.0, job.kill_at - now)))
                    if job.done:
                        return
                    act = "sweep"
                else:
                    wake = job.kill_at if job.reason is not None else job.deadline
                    self._cond.wait(None if wake is None else max(0.0, wake - now))
                    continue
            if act == "interrupt":
                self._interrupt(job)
            elif act == "sweep":
                self._sweep(job, passes=1)
            else:
                log(f"exec {job.id}: the REPL did not stop within {self._kill_grace:g} s of the interrupt; killing it")
                job.worker.kill()

    def _wait_done(self, job):
        with self._cond:
            while not job.done:
                self._cond.wait()

    def _interrupt(self, job):
        cg = self._cgroups
        # KeyboardInterrupt for the Python code (repeated every second by the worker) ...
        job.worker.send({"type": "interrupt", "id": job.id, "reason": job.reason})
        if job.cgroup is not None:
            # ... and SIGKILL for every other process of the call, wherever it went (its
            # own session, a double fork): the worker steps out of the call's cgroup first.
            job.repl_before = cg.procs(cg.repl)
            cg.move(job.worker.pid, cg.repl)
            cg.kill(job.cgroup)

    def _finish(self, job):
        """Runs after the exit frame has left: nothing here delays the host."""
        cg = self._cgroups
        if not cg.enabled:
            return
        worker = job.worker
        if job.cgroup is None:
            if not worker.dead:
                self._park(worker)
            return
        if not worker.dead and job.interrupted_at is None:
            self._park(worker)  # out of the call's cgroup, into the next one
        if job.interrupted_at is not None or worker.dead or job.kill_leftovers:
            cg.kill(job.cgroup)
        if job.interrupted_at is not None and not worker.dead:
            self._sweep(job, SWEEP_PASSES)
            self._park(worker)  # from user/repl, where _interrupt put it
        # Processes a call starts keep running after it ends normally (documented); their
        # cgroup is removed once they are gone. With the next exec waiting, the rmdirs
        # wait for a finish with nothing queued.
        with self._cond:
            queued = bool(self._queue)
        if queued:
            cg.remove_later(job.cgroup)
        else:
            cg.remove(job.cgroup)
            cg.tidy()

    def _sweep(self, job, passes):
        """Processes the interrupted code started after the worker left the call's cgroup
        (before its KeyboardInterrupt landed) are in user/repl: back into the call's
        cgroup with them, and kill it again, until none are left."""
        cg = self._cgroups
        for _ in range(passes):
            strays = cg.procs(cg.repl) - job.repl_before - {job.worker.pid}
            if not strays:
                return
            for pid in strays:
                cg.move(pid, job.cgroup)
            cg.kill(job.cgroup)

    def _stop_worker(self):
        with self._cond:
            worker = self._worker
        if worker is None:
            return
        worker.close_channel()
        if not worker.gone.wait(SHUTDOWN_GRACE):
            worker.kill()
            worker.gone.wait(SHUTDOWN_GRACE)

    # -- called from a worker's link thread --

    def _send_output(self, job, stream, data):
        frames = self._output_frames(job, stream, data)
        if frames:
            self._writer.send_encoded(b"".join(frames))

    def _output_frames(self, job, stream, data):
        """Encoded output frames for `data`, within what is left of the job's limit."""
        if not data:
            return []
        if job.room <= 0:
            job.truncated = True
            return []
        if len(data) > job.room:
            data = data[: _utf8_cut(data, 0, job.room)]
            job.truncated = True
            job.room = len(data)
        job.room -= len(data)
        frames = []
        start = 0
        while start < len(data):
            end = _utf8_cut(data, start, OUTPUT_FRAME)
            if end == start:  # cannot happen with valid UTF-8; never loop
                break
            frames.append(FrameWriter.encode({"type": "output", "id": job.id, "stream": stream}, data[start:end]))
            start = end
        return frames

    def _from_worker(self, worker, frames):
        """Relays a worker's frames: only those of its current exec, validated."""
        out = []
        for raw, payload in frames:
            try:
                header = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError):
                continue
            if not isinstance(header, dict):
                continue
            kind = header.get("type")
            if kind == "ready":
                with self._cond:
                    if worker.ready_at is None:
                        worker.ready_at = time.monotonic()
                        self._cond.notify_all()
                continue
            with self._cond:
                job = self._current
                if job is None or job.done or job.worker is not worker or header.get("id") != job.id or not _is_int(header.get("id")):
                    continue  # stale, forged or for nobody: dropped
                if kind == "output":
                    stream = header.get("stream")
                    if stream not in ("stdout", "stderr"):
                        continue
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        payload = payload.decode("utf-8", "replace").encode("utf-8")
                    out += self._output_frames(job, stream, payload)
                    if job.ending and job.kill_at is not None:
                        job.kill_at = time.monotonic() + self._kill_grace  # the output moves
                elif kind == "alive":
                    if job.kill_at is not None:
                        job.kill_at = time.monotonic() + self._kill_grace
                    if header.get("ending") is True:
                        # From here, output arriving is the agent's own flush making
                        # progress (not a stuck REPL). A forged one buys user code no more
                        # than forged alive frames already do.
                        job.ending = True
                elif kind == "exit":
                    if self._cgroups.pids_limit_hits() > job.pids_before and self._busiest_is(job.cgroup):
                        job.kill_leftovers = True
                        out += self._output_frames(
                            job,
                            "stderr",
                            f"podflare: this call hit the sandbox's process limit ({PIDS_MAX}); the processes it started are killed as it ends\n".encode(),
                        )
                    out.append(FrameWriter.encode(self._exit_frame(job, header)))
                    job.done = True
                    self._cond.notify_all()
        if out:
            self._writer.send_encoded(b"".join(out))

    def _exit_frame(self, job, header):
        """The exit frame for `job` from the worker's claims, checked and clipped; the
        control process's own knowledge (timeout, cancel, truncation) wins."""
        code = header.get("code")
        frame = {"type": "exit", "id": job.id, "code": code if _is_int(code) and -(1 << 31) <= code < 1 << 31 else 1}
        error = header.get("error")
        if isinstance(error, dict):
            frame["error"] = {
                "name": _clip(str(error.get("name", "")), 200),
                "value": _clip(str(error.get("value", "")), MAX_MESSAGE),
                "traceback": _clip(str(error.get("traceback", "")), MAX_TRACEBACK, keep_tail=True),
            }
        if header.get("truncated") is True or job.truncated:
            frame["truncated"] = True
        if job.reason == "timeout":
            frame.update(code=124, timed_out=True)
        elif job.reason == "cancel":
            frame.update(code=130, cancelled=True)
        return frame

    def _worker_died(self, worker, status):
        cause, code = _death_cause(status)
        now = time.monotonic()
        oom = self._cgroups.oom_kills()
        out = []
        with self._cond:
            worker.dead = True
            if self._worker is worker:
                self._worker = None
                quick = worker.ready_at is None or now - worker.ready_at < QUICK_DEATH
                self._respawn_at = now + (self._backoff if quick else 0.0)
                self._backoff = min(self._backoff * 2, RESPAWN_BACKOFF_MAX) if quick else RESPAWN_BACKOFF_MIN
            job = self._current
            if job is not None and not job.done and job.worker is worker:
                out_of_memory = oom > job.oom_before
                if job.killed_stuck:
                    name = "ReplKilled"
                    value = f"the code did not stop within {self._kill_grace:g} s of the interrupt, so the Python REPL process was killed"
                elif out_of_memory:
                    name = "OutOfMemory"
                    limit = f" ({self._cgroups.memory_max >> 20} MiB)" if self._cgroups.memory_max else ""
                    value = f"the sandbox ran out of memory{limit} and the Python REPL process was killed"
                else:
                    name = "ReplDied"
                    value = f"the Python REPL process {cause}"
                value += "; its state (variables, imports) is lost and a fresh REPL has been started"
                text = f"podflare: {value}\n"
                out += self._output_frames(job, "stderr", text.encode())
                frame = {"type": "exit", "id": job.id, "code": code, "error": {"name": name, "value": value, "traceback": ""}}
                if job.truncated:
                    frame["truncated"] = True
                if job.reason == "timeout":
                    frame.update(code=124, timed_out=True)
                elif job.reason == "cancel":
                    frame.update(code=130, cancelled=True)
                out.append(FrameWriter.encode(frame))
                job.done = True
            elif not self._closing:
                self._restart_note = f"podflare: the Python REPL process {cause} between calls; its state is lost and a fresh REPL has been started\n"
            self._cond.notify_all()
        log(f"REPL worker pid={worker.pid} {cause}")
        if out:
            self._writer.send_encoded(b"".join(out))


class _Upload:
    __slots__ = ("fd", "tmp", "path", "mode", "size", "failure")

    def __init__(self, fd, tmp, path, mode):
        self.fd, self.tmp, self.path, self.mode = fd, tmp, path, mode
        self.size = 0
        self.failure = None

    def discard(self):
        """Closes and removes the temporary file; idempotent."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


class _Download:
    __slots__ = ("fd", "window", "sent", "acked", "aborted")

    def __init__(self, fd, window):
        self.fd, self.window = fd, window
        self.sent = self.acked = 0
        self.aborted = False


class FileTransfers:
    """Atomic uploads (temp file in the target dir, fsync, rename) and credit-windowed downloads."""

    def __init__(self, writer):
        self._writer = writer
        self._uploads = {}  # reader thread only
        self._cond = threading.Condition()  # guards _downloads and their counters
        self._downloads = {}

    def reset(self):
        """The host went away: unfinished transfers are abandoned."""
        for upload in self._uploads.values():
            upload.discard()
        self._uploads.clear()
        with self._cond:
            for download in self._downloads.values():
                download.aborted = True
            self._cond.notify_all()

    def write_begin(self, rid, header, payload):
        path = _check_path(header.get("path"))
        mode = _int_field(header, "mode", 0, 0o7777, nullable=True)
        if rid in self._uploads:
            raise RequestError("bad_request", f"upload {rid} is already open")
        if len(self._uploads) >= MAX_UPLOADS:
            raise RequestError("busy", "too many open uploads")
        directory, name = os.path.split(path)
        if name in ("", ".", "..") or os.path.isdir(path):
            raise RequestError("is_directory", f"{path} names a directory")
        try:
            os.makedirs(directory, exist_ok=True)
            if mode is None:
                try:
                    mode = stat.S_IMODE(os.stat(path).st_mode)
                except FileNotFoundError:
                    mode = 0o644
            tmp = os.path.join(directory, f".{name[:32]}.podflare-{os.urandom(8).hex()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except (FileExistsError, NotADirectoryError):
            raise RequestError("bad_path", f"a parent of {path} is not a directory") from None
        except OSError as exc:
            raise RequestError("io_error", _safe_str(exc)) from None
        self._uploads[rid] = _Upload(fd, tmp, path, mode)
        return {"type": "ok", "id": rid}

    def write_chunk(self, rid, header, payload):
        upload = self._uploads.get(rid)
        if upload is None:
            raise RequestError("unknown_transfer", f"no open upload {rid}")
        if upload.failure is not None:
            return None  # reported once; chunks already in flight are dropped silently
        try:
            _write_all(upload.fd, payload)
        except OSError as exc:
            upload.failure = _safe_str(exc)
            upload.discard()
            raise RequestError("io_error", f"write failed: {exc}") from None
        upload.size += len(payload)
        return None

    def write_end(self, rid, header, payload):
        size = _int_field(header, "size", 0, ID_LIMIT - 1)
        upload = self._uploads.pop(rid, None)
        if upload is None:
            raise RequestError("unknown_transfer", f"no open upload {rid}")
        try:
            if upload.failure is not None:
                raise RequestError("io_error", f"the upload failed earlier: {upload.failure}")
            if upload.size != size:
                raise RequestError("bad_request", f"size mismatch: received {upload.size} bytes, expected {size}")
            try:
                os.fchmod(upload.fd, upload.mode)
                os.fsync(upload.fd)
                os.replace(upload.tmp, upload.path)
                upload.tmp = None  # it is the target now: discard() must leave it
                dir_fd = os.open(os.path.dirname(upload.path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)  # makes the rename itself durable
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                raise RequestError("io_error", _safe_str(exc)) from None
        finally:
            upload.discard()
        return {"type": "ok", "id": rid, "size": size}

    def write_abort(self, rid, header, payload):
        upload = self._uploads.pop(rid, None)
        if upload is not None:
            upload.discard()
        return {"type": "ok", "id": rid}  # idempotent, like cancel

    def read(self, rid, header, payload):
        path = _check_path(header.get("path"))
        window = _int_field(header, "window", MIN_WINDOW, MAX_WINDOW)
        with self._cond:
            if rid in self._downloads:
                raise RequestError("bad_request", f"download {rid} is already open")
            if len(self._downloads) >= MAX_DOWNLOADS:
                raise RequestError("busy", "too many open downloads")
        try:
            # O_NONBLOCK: opening a FIFO must not hang; such files are refused below.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise RequestError("not_found", f"{path} does not exist") from None
        except OSError as exc:
            raise RequestError("io_error", _safe_str(exc)) from None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise RequestError("is_directory", f"{path} is a directory")
            if not stat.S_ISREG(info.st_mode):
                raise RequestError("io_error", f"{path} is not a regular file")
            os.set_blocking(fd, True)
        except OSError as exc:
            os.close(fd)
            raise RequestError("io_error", _safe_str(exc)) from None
        except RequestError:
            os.close(fd)
            raise
        download = _Download(fd, window)
        with self._cond:
            self._downloads[rid] = download
        try:
            threading.Thread(target=self._stream, args=(rid, download, info.st_size), name=f"podflare-read-{rid}", daemon=True).start()
        except RuntimeError:  # out of threads
            with self._cond:
                del self._downloads[rid]
            os.close(fd)
            raise RequestError("busy", "cannot start a download thread") from None
        return None

    def read_ack(self, rid, header, payload):
        consumed = _int_field(header, "bytes", 0, ID_LIMIT - 1)
        with self._cond:
            download = self._downloads.get(rid)  # unknown: the transfer just ended
            if download is not None and consumed > download.acked:
                download.acked = min(consumed, download.sent)
                self._cond.notify_all()
        return None

    def read_abort(self, rid, header, payload):
        with self._cond:
            download = self._downloads.get(rid)
            if download is not None:
                download.aborted = True
                self._cond.notify_all()
        return None

    def _stream(self, rid, download, size):
        try:
            self._writer.send({"type": "read_begin", "id": rid, "size": size})
            while True:
                with self._cond:
                    while not download.aborted and download.sent - download.acked >= download.window:
                        self._cond.wait()
                    if download.aborted:
                        return
                    credit = download.window - (download.sent - download.acked)
                data = os.read(download.fd, min(READ_CHUNK, credit))
                if not data:
                    break
                with self._cond:
                    # Counted before sending, so an ack for these bytes is never clamped.
                    download.sent += len(data)
                if not self._writer.send({"type": "data", "id": rid}, data):
                    return
            self._writer.send({"type": "read_end", "id": rid, "size": download.sent})
        except OSError as exc:
            self._writer.send({"type": "error", "id": rid, "code": "io_error", "message": _clip(_safe_str(exc), MAX_MESSAGE)})
        finally:
            with self._cond:
                if self._downloads.get(rid) is download:
                    del self._downloads[rid]
            os.close(download.fd)


def _mix_entropy(entropy):
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, rand_pool_info(entropy))
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _replace_file(path, text, mode):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".podflare.tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _write_machine_id(machine_id):
    _replace_file("/etc/machine-id", machine_id + "\n", 0o444)


def _write_hosts(hostname):
    # So that the new hostname resolves (Python's socket.getfqdn, sudo-like tools).
    _replace_file("/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost\n", 0o644)


class Agent:
    """The control process's reader thread: parses frames, answers requests and queues
    execs for the dispatcher (`runner`, an ExecScheduler)."""

    def __init__(self, fd, reconnects, skip_system_restore, writer, runner, transfers):
        self._fd = fd
        self._reconnects = reconnects  # virtio port: EOF means "host not connected (yet)"
        self._skip_system_restore = skip_system_restore
        self._writer = writer
        self._runner = runner
        self._transfers = transfers
        self._handlers = {
            "hello": self._hello,
            "ping": self._ping,
            "exec": self._exec,
            "cancel": self._cancel,
            "restore": self._restore,
            "write_begin": transfers.write_begin,
            "write_chunk": transfers.write_chunk,
            "write_end": transfers.write_end,
            "write_abort": transfers.write_abort,
            "read": transfers.read,
            "read_ack": transfers.read_ack,
            "read_abort": transfers.read_abort,
        }

    def read_loop(self):
        _pin_helper_thread()
        parser = FrameParser()
        connected = False  # until the first bytes arrive
        while True:
            try:
                data = os.read(self._fd, min(parser.room(), 1 << 20))
            except OSError as exc:
                if not self._reconnects or exc.errno == errno.EBADF:
                    log(f"channel read failed: {exc}")
                    break
                data = b""  # e.g. EIO around a reconnect: handled like a disconnect
            if not data:
                if not self._reconnects:
                    break
                if connected:
                    # Nothing of the old session may leak into the next one.
                    connected = False
                    parser.reset()
                    self._transfers.reset()
                    log("host disconnected")
                # poll() reports HUP at once while disconnected, so sleep instead.
                time.sleep(DISCONNECTED_POLL)
                continue
            if not connected:
                connected = True
                log("host connected")
            try:
                for kind, first, payload in parser.feed(data):
                    if kind == "frame":
                        self._dispatch(first, payload)
                    else:
                        self._writer.send({"type": "error", "id": None, "code": "bad_frame", "message": first})
            except Exception:  # _dispatch catches per request; this is a last resort
                log(f"reader: {traceback.format_exc()}")
                parser.reset()
        log("channel closed; exiting")
        self._transfers.reset()
        self._runner.shutdown()
        if not self._runner.stopped.wait(SHUTDOWN_GRACE):
            os._exit(0)  # user code ignores KeyboardInterrupt; the channel is gone anyway

    def _dispatch(self, raw_header, payload):
        rid = None
        try:
            try:
                header = json.loads(raw_header.decode("utf-8"))
            except (ValueError, RecursionError) as exc:
                raise RequestError("bad_request", f"header is not UTF-8 JSON: {exc}") from None
            if not isinstance(header, dict):
                raise RequestError("bad_request", "header is not a JSON object")
            if _is_int(header.get("id")) and 1 <= header["id"] < ID_LIMIT:
                rid = header["id"]
            kind = header.get("type")
            if not isinstance(kind, str):
                raise RequestError("bad_request", 'header has no string "type"')
            handler = self._handlers.get(kind)
            if handler is None:
                raise RequestError("bad_request", f"unknown type {_clip(kind, 64)!r}")
            if rid is None:
                raise RequestError("bad_request", '"id" must be an integer in [1, 2**53)')
            reply = handler(rid, header, payload)
            if reply is not None:
                self._writer.send(reply)
        except RequestError as exc:
            self._writer.send({"type": "error", "id": rid, "code": exc.code, "message": _clip(exc.message, MAX_MESSAGE)})
        except Exception as exc:  # a bug must never take the channel down
            log(f"request failed: {traceback.format_exc()}")
            self._writer.send({"type": "error", "id": rid, "code": "io_error", "message": _clip(f"internal error: {exc!r}", MAX_MESSAGE)})

    @staticmethod
    def identity():
        return {"version": PROTOCOL, "agent": f"podflare-agent/{VERSION}", "python": "%d.%d.%d" % sys.version_info[:3], "pid": os.getpid()}

    def _hello(self, rid, header, payload):
        version = header.get("version")
        if not _is_int(version) or version != PROTOCOL:
            raise RequestError("unsupported_version", f"this agent speaks protocol {PROTOCOL}")
        return {"type": "hello", "id": rid, **self.identity()}

    def _ping(self, rid, header, payload):
        return {"type": "pong", "id": rid}

    def _exec(self, rid, header, payload):
        language = header.get("language")
        if language not in ("python", "bash"):
            raise RequestError("bad_request", '"language" must be "python" or "bash"')
        timeout_ms = _int_field(header, "timeout_ms", 1, ID_LIMIT - 1, nullable=True)
        max_output = _int_field(header, "max_output_bytes", 0, ID_LIMIT - 1, nullable=True)
        try:
            code = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("bad_request", "the code is not UTF-8") from None
        if language == "bash" and "\0" in code:
            raise RequestError("bad_request", "bash code cannot contain NUL")
        job = ControlJob(rid, language, payload, None if timeout_ms is None else timeout_ms / 1000, DEFAULT_MAX_OUTPUT if max_output is None else max_output)
        if not self._runner.submit(job):
            raise RequestError("busy", f"more than {MAX_QUEUED_EXECS} execs queued")
        return None

    def _cancel(self, rid, header, payload):
        target = _int_field(header, "target", 1, ID_LIMIT - 1)
        job = self._runner.cancel(target)
        if job is not None:
            self._writer.send({"type": "exit", "id": job.id, "code": 130, "cancelled": True})
        return {"type": "ok", "id": rid}

    def _restore(self, rid, header, payload):
        try:
            entropy = base64.b64decode(header.get("entropy"), validate=True)
        except (TypeError, ValueError):
            entropy = b""
        if not 32 <= len(entropy) <= 512:
            raise RequestError("bad_request", '"entropy" must be base64 of 32..512 bytes')
        time_ns = _int_field(header, "time_ns", 0, (1 << 63) - 1)
        hostname = _str_field(header, "hostname", HOSTNAME_RE)
        machine_id = _str_field(header, "machine_id", MACHINE_ID_RE)
        failures = []
        if not self._skip_system_restore:
            steps = (
                ("entropy", lambda: _mix_entropy(entropy)),
                ("clock", lambda: time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)),
                ("hostname", lambda: socket.sethostname(hostname)),
                ("hosts", lambda: _write_hosts(hostname)),
                ("machine-id", lambda: _write_machine_id(machine_id)),
            )
            for name, step in steps:
                try:
                    step()
                except (OSError, OverflowError, ValueError) as exc:
                    failures.append(f"{name}: {exc}")
        # After the CRNG reseed, so clones of one snapshot stop sharing the REPL's
        # random sequence: the worker reseeds before it runs anything else.
        self._runner.reseed()
        if failures:
            raise RequestError("io_error", "restore incomplete: " + "; ".join(failures))
        return {"type": "ok", "id": rid}


def _find_port(timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            entries = sorted(os.listdir(VIRTIO_PORTS))
        except OSError:
            entries = []
        for entry in entries:
            try:
                with open(os.path.join(VIRTIO_PORTS, entry, "name"), encoding="ascii", errors="replace") as f:
                    if f.read().strip() == PORT_NAME:
                        return "/dev/" + entry
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise SystemExit(f"podflare-agent: no virtio port named {PORT_NAME}")
        time.sleep(0.05)


def _lock_memory():
    """Keeps the control process's pages resident (mlockall, on fault). The interpreter's
    code is shared with the REPL worker and may be charged to `user`; when user code drives
    `user` into reclaim or an OOM kill, those pages would otherwise be evicted and the
    agent stall on re-reading them from disk (a ping took 1.1 s in that case). Locks are
    not inherited across fork or exec: the worker and user code are unaffected."""
    mcl_current, mcl_future, mcl_onfault = 1, 2, 4
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlockall(mcl_current | mcl_future | mcl_onfault) != 0:
            log(f"mlockall: {os.strerror(ctypes.get_errno())}")
    except Exception as exc:  # best effort: the agent works without it
        log(f"mlockall: {exc!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="podflare guest agent")
    channel = parser.add_mutually_exclusive_group()
    channel.add_argument("--port", help="virtio-serial device (default: found by name in sysfs)")
    channel.add_argument("--fd", type=int, help="an open channel fd, e.g. a socket (tests); EOF ends the agent")
    parser.add_argument(
        "--skip-system-restore",
        action="store_true",
        help="restore only reseeds random and leaves the CRNG, clock, hostname and machine-id alone (host-side tests)",
    )
    parser.add_argument(
        "--cgroup-root",
        help=f"a cgroup v2 directory to lay out and use (default: {CGROUP_ROOT} with --port or no channel option, none with --fd)",
    )
    parser.add_argument("--no-cgroups", action="store_true", help="never use cgroups")
    parser.add_argument("--kill-grace", type=float, default=KILL_GRACE, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the REPL process (internal)
    parser.add_argument("--cpus", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fd is not None and args.fd < 3:
        parser.error("--fd must be 3 or more")
    if args.worker and args.fd is None:
        parser.error("--worker needs --fd")

    global _log_fd
    for std_fd in (0, 1, 2):  # open the lowest free fd, so pipes never land on 0..2
        try:
            os.fstat(std_fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    _log_fd = os.dup(2)  # diagnostics stay off the captured fds 1 and 2
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    sys.stdin = open(os.devnull, encoding="utf-8")
    if args.worker:
        worker_main(args)
        return

    if args.fd is not None:
        fd = args.fd
        os.set_inheritable(fd, False)
    else:
        fd = os.open(args.port or _find_port(), os.O_RDWR | os.O_CLOEXEC)
    cgroup_root = None
    if not args.no_cgroups:
        cgroup_root = args.cgroup_root or (CGROUP_ROOT if args.fd is None else None)
        if cgroup_root is not None and not os.path.exists(os.path.join(cgroup_root, "cgroup.procs")):
            log(f"{cgroup_root} is not a cgroup v2 directory; running without cgroups")
            cgroup_root = None
    cgroups = Cgroups(cgroup_root)
    if args.fd is None and cgroup_root == CGROUP_ROOT:
        cgroups.favor_dynmods()  # the guest's own mount only, never a host's in tests
    cgroups.setup()
    if args.fd is None and cgroup_root == CGROUP_ROOT:
        _lock_memory()  # in the guest only: never lock a test host's memory
    cpus = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
    worker_argv = [sys.executable, "-u", os.path.realpath(__file__), "--worker", "--cpus", cpus]

    writer = FrameWriter(fd)
    scheduler = ExecScheduler(writer, cgroups, worker_argv, kill_grace=args.kill_grace)
    cgroups.watch_pids_limit(scheduler.pids_limit_hit)
    transfers = FileTransfers(writer)
    agent = Agent(fd, args.fd is None, args.skip_system_restore, writer, scheduler, transfers)
    log(f"version {VERSION} started pid={os.getpid()}")
    # First frame of every agent process: the host learns that the state and requests of
    # an earlier agent are gone. (The REPL worker dying is told through exit frames.)
    writer.send({"type": "started", "id": None, **agent.identity()})
    threading.Thread(target=agent.read_loop, name="podflare-reader", daemon=True).start()
    scheduler.run_forever()
    os._exit(0)  # only reached once the channel is closed for good (--fd)


if __name__ == "__main__":
    main()
