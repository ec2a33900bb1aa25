"""The control process (control_main): its reader thread (Agent) parses the host's
frames and routes each request (hello, ping, exec, cancel, restore, file transfers);
execs are queued for the scheduler, which runs on the main thread."""

import ctypes
import errno
import json
import os
import sys
import threading
import time
import traceback

from .cgroups import CGROUP_ROOT, Cgroups
from .files import FileTransfers
from .identity import parse_restore, restore_system
from .protocol import (
    DEFAULT_MAX_OUTPUT,
    ID_LIMIT,
    MAX_MESSAGE,
    MAX_QUEUED_EXECS,
    PROTOCOL,
    SHUTDOWN_GRACE,
    VERSION,
    FrameParser,
    FrameWriter,
    RequestError,
    _clip,
    _int_field,
    _is_int,
)
from .runtime import _pin_helper_thread, log
from .scheduler import ControlJob, ExecScheduler
from .supervisor import worker_argv

PORT_NAME = "org.podflare.agent"
VIRTIO_PORTS = "/sys/class/virtio-ports"
DISCONNECTED_POLL = 0.02  # the port reads EOF (and polls HUP) until the host connects


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
        entropy, time_ns, hostname, machine_id = parse_restore(header)
        failures = [] if self._skip_system_restore else restore_system(entropy, time_ns, hostname, machine_id)
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


def control_main(args):
    """The control process: owns the channel (the virtio port, or --fd in tests), the
    cgroups, the scheduler on this (main) thread and the reader thread."""
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

    writer = FrameWriter(fd)
    scheduler = ExecScheduler(writer, cgroups, worker_argv(cpus), kill_grace=args.kill_grace)
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
