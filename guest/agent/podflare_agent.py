#!/usr/bin/python3
"""podflare guest agent: serves spec/guest-protocol.md (protocol 1) over virtio-serial.

Threads, and why:
- main: runs execs one at a time from a FIFO queue. User code must run on the main thread
  because only there can a timeout interrupt it with SIGINT -> KeyboardInterrupt, which
  also breaks out of time.sleep() and other blocking calls.
- reader: parses frames and answers everything but exec itself (ping must be answered
  while user code runs); execs are queued for the main thread.
- watchdog: turns deadlines and cancels into SIGINTs for the main thread.
- flusher: forwards captured output at least every few milliseconds.
- fd pump: forwards what child processes (and C code) write to fds 1 and 2.
- one thread per file download, paced by the host's credit window.
Standard library only: this file is copied alone into the guest image.
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

VERSION = "1.0.0"
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
KICK_INTERVAL = 1.0  # SIGINT is repeated while code swallows KeyboardInterrupt
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

_log_fd = 2  # main() points this at a dup of the original stderr (the console)


def log(message):
    try:
        os.write(_log_fd, f"podflare-agent: {message}\n".encode("utf-8", "replace"))
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

    def start(self):
        threading.Thread(target=self._flush_loop, name="podflare-flusher", daemon=True).start()

    def begin(self, job_id, limit):
        with self._cond:
            self._job_id, self._room, self._truncated = job_id, limit, False

    def push(self, stream, text):
        data = text.encode("utf-8", "replace")
        with self._cond:
            while self._job_id is not None and self._pending >= PENDING_OUTPUT_CAP:
                self._cond.wait()
            if self._job_id is None or not data:
                return
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
            if frames:
                self._writer.send_encoded(b"".join(frames))
        return truncated

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

    def __init__(self, collector, stream, fd):
        super().__init__()
        self._collector = collector
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
        return len(text)


class FdCapture:
    """Points fds 1 and 2 at pipes and forwards what arrives, so output of child
    processes (os.system, subprocess, bash) and of C code reaches the host too."""

    def __init__(self, collector):
        self._collector = collector
        self._streams = {}  # pipe read end -> (stream, incremental decoder)
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)  # inheritable: children write here
            os.close(write_end)
            os.set_blocking(read_end, False)
            self._streams[read_end] = (stream, codecs.getincrementaldecoder("utf-8")("replace"))
        self._wake_r, self._wake_w = os.pipe()
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
    __slots__ = ("id", "language", "code", "timeout", "max_output", "deadline", "reason", "next_kick")

    def __init__(self, job_id, language, code, timeout, max_output):
        self.id = job_id
        self.language = language
        self.code = code
        self.timeout = timeout  # seconds or None
        self.max_output = max_output
        self.deadline = None
        self.reason = None  # None, "timeout" or "cancel": why the exec is being interrupted
        self.next_kick = 0.0


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


class ExecRunner:
    """The REPL: runs execs one at a time on the main thread; owns the queue and timeouts."""

    def __init__(self, writer, collector, capture):
        self._writer = writer
        self._collector = collector
        self._capture = capture
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._current = None
        self._closing = False
        self._armed = False  # user code is on the main thread's stack right now
        self._main_ident = threading.get_ident()
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

    def submit(self, job):
        with self._cond:
            if self._closing or len(self._queue) >= MAX_QUEUED_EXECS:
                return False
            self._queue.append(job)
            self._cond.notify_all()
            return True

    def cancel(self, target):
        """Removes and returns exec `target` if queued; interrupts it if running."""
        with self._cond:
            for job in self._queue:
                if job.id == target:
                    self._queue.remove(job)
                    return job
            job = self._current
            if job is not None and job.id == target and job.reason is None:
                job.reason = "cancel"
                self._cond.notify_all()
        return None

    def shutdown(self):
        """The channel is gone for good: drop the queue and interrupt the running exec."""
        with self._cond:
            self._closing = True
            self._queue.clear()
            if self._current is not None and self._current.reason is None:
                self._current.reason = "cancel"
            self._cond.notify_all()

    def run_forever(self):
        try:
            all_cpus = os.sched_getaffinity(0)
            idle_cpus = {min(all_cpus)}
            while True:
                with self._cond:
                    if not self._queue and not self._closing:
                        # Wait on the helpers' vCPU, so the reader's wake-up is not an
                        # inter-processor interrupt (milliseconds under TCG) ...
                        _set_affinity(idle_cpus)
                        while not self._queue and not self._closing:
                            self._cond.wait()
                        # ... and run user code with every CPU: the processes and
                        # threads it starts inherit this mask.
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
        self._collector.begin(job.id, job.max_output)
        try:
            result = self._run_python(job) if job.language == "python" else self._run_bash(job)
        except Exception as exc:  # an agent bug: the exec still ends with exactly one exit
            log(f"exec {job.id}: {traceback.format_exc()}")
            result = {"code": 1, "error": _error_info(exc, "")}
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
                        signal.pthread_kill(self._main_ident, signal.SIGINT)
                    self._cond.wait(job.next_kick - now)


_CALL_ARMED_CODE = ExecRunner._call_armed.__code__


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
    """The reader thread: parses frames, answers requests and queues execs."""

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
        job = ExecJob(rid, language, code, None if timeout_ms is None else timeout_ms / 1000, DEFAULT_MAX_OUTPUT if max_output is None else max_output)
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
        # random sequence. The module object is the one user code imported.
        random.seed(os.urandom(32))
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
    args = parser.parse_args(argv)
    if args.fd is not None and args.fd < 3:
        parser.error("--fd must be 3 or more")

    global _log_fd
    for std_fd in (0, 1, 2):  # open the lowest free fd, so pipes never land on 0..2
        try:
            os.fstat(std_fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    _log_fd = os.dup(2)  # diagnostics stay off the captured fds 1 and 2
    if args.fd is not None:
        fd = args.fd
        os.set_inheritable(fd, False)
    else:
        fd = os.open(args.port or _find_port(), os.O_RDWR | os.O_CLOEXEC)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    sys.stdin = open(os.devnull, encoding="utf-8")

    writer = FrameWriter(fd)
    collector = OutputCollector(writer)
    capture = FdCapture(collector)
    runner = ExecRunner(writer, collector, capture)
    transfers = FileTransfers(writer)
    agent = Agent(fd, args.fd is None, args.skip_system_restore, writer, runner, transfers)
    sys.stdout = CapturedStream(collector, "stdout", 1)
    sys.stderr = CapturedStream(collector, "stderr", 2)
    sys.argv = [""]
    if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
        sys.path[0] = ""  # as in the interactive interpreter: imports see the cwd
    runner.install()
    collector.start()
    capture.start()
    log(f"version {VERSION} started pid={os.getpid()}")
    # First frame of every agent process: the host learns that the state and requests of
    # an earlier agent (say, OOM-killed with the user code inside it) are gone.
    writer.send({"type": "started", "id": None, **agent.identity()})
    threading.Thread(target=agent.read_loop, name="podflare-reader", daemon=True).start()
    runner.run_forever()
    # Only reached once the channel is closed for good (--fd). User threads may still be
    # running and must not keep the process alive.
    os._exit(0)


if __name__ == "__main__":
    main()
