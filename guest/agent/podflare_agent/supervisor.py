"""The REPL worker's life in the control process: one worker process (WorkerProcess: its
argv, socket pair, and the link thread that relays its frames and notices its death), and
its supervision for the scheduler (WorkerSupervisor: start with back-off, park in the next
exec's cgroup, replace after a death, stop)."""

import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

from .protocol import SHUTDOWN_GRACE, FrameParser, FrameWriter
from .runtime import _pin_helper_thread, log

WORKER_FD_ARG = "--fd"
WORKER_SEND_TIMEOUT = 5.0  # a worker that does not read its socket for this long is killed
RESPAWN_BACKOFF_MIN, RESPAWN_BACKOFF_MAX = 0.1, 5.0
QUICK_DEATH = 2.0  # a worker that dies this soon after starting backs the respawn off
MAX_WORKER_READ = 1 << 20
# The package directory: `python3 <dir>` runs its __main__.py, as init starts the agent.
_PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__))


def worker_argv(cpus):
    """argv of a new REPL worker (WorkerProcess adds the channel's `--fd N`)."""
    return [sys.executable, "-u", _PACKAGE_DIR, "--worker", "--cpus", cpus]


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


class WorkerSupervisor:
    """The REPL worker's life, for the ExecScheduler: starts one (backing off after quick
    deaths), parks the idle one in the cgroup of the next exec, notes its death, stops it.

    `cond` is the scheduler's condition: it guards `current` and `respawn_at`, which the
    scheduler reads under it to decide between waiting, spawning and parking."""

    def __init__(self, cond, cgroups, argv, on_frames, on_death):
        self._cond = cond
        self._cgroups = cgroups
        self._argv = argv
        self._on_frames = on_frames
        self._on_death = on_death
        self.current = None  # the live worker
        self.respawn_at = 0.0
        self._backoff = RESPAWN_BACKOFF_MIN
        # The exec cgroup the idle worker already sits in (dispatcher thread only): moving a
        # process between cgroups costs milliseconds under TCG (1 to 5 ms p50 measured), so
        # it is done once per exec, after the exit frame, instead of twice on the exec's path.
        self.parked = None  # (worker, cgroup)

    def needs_park(self, worker):
        """A new worker goes into its first exec cgroup before any exec (caller holds cond)."""
        return self._cgroups.enabled and (self.parked is None or self.parked[0] is not worker)

    def take_parked(self):
        """(worker, cgroup) where the idle worker waits for the exec starting now, or None."""
        parked, self.parked = self.parked, None
        return parked

    def reseed(self):
        """After a restore: the REPL reseeds `random` before it runs anything else (its
        channel is in order). No worker: the next one seeds itself from the fresh CRNG."""
        with self._cond:
            worker = self.current
        if worker is not None and not worker.dead:
            worker.send({"type": "reseed", "id": None}, timeout=1.0)

    def park(self, worker):
        """Moves the idle worker into a fresh exec cgroup, where the next exec will run
        (falls back to user/repl, and a move on the exec's path, if that fails)."""
        cg = self._cgroups
        path = None if worker.dead else cg.new_exec()
        if path is not None and cg.move(worker.pid, path):
            self.parked = (worker, path)
            return
        if path is not None:
            cg.remove(path)
        if not worker.dead:
            cg.move(worker.pid, cg.repl)
        self.parked = (worker, None)  # no retry until the next exec ends

    def spawn(self):
        cg = self._cgroups
        cg.kill(cg.repl)  # what the previous worker left behind (it is gone by now)
        if self.parked is not None:
            _, parked = self.parked
            self.parked = None
            if parked is not None:  # ... idle in its parked cgroup, too
                cg.kill(parked)
                cg.remove(parked)
        try:
            worker = WorkerProcess(cg.spawn_prefix() + self._argv, self._on_frames, self._on_death)
        except OSError as exc:
            log(f"cannot start the REPL worker: {exc}")
            with self._cond:
                self.respawn_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, RESPAWN_BACKOFF_MAX)
            return
        cg.move(worker.pid, cg.repl)  # the shell prefix did it already; harmless
        with self._cond:
            self.current = worker
        worker.start()
        log(f"REPL worker started pid={worker.pid}")

    def died(self, worker, now):
        """`worker` is reaped (caller holds cond): the next one starts at once, or after a
        back-off if this one died soon after starting."""
        worker.dead = True
        if self.current is worker:
            self.current = None
            quick = worker.ready_at is None or now - worker.ready_at < QUICK_DEATH
            self.respawn_at = now + (self._backoff if quick else 0.0)
            self._backoff = min(self._backoff * 2, RESPAWN_BACKOFF_MAX) if quick else RESPAWN_BACKOFF_MIN

    def stop(self):
        with self._cond:
            worker = self.current
        if worker is None:
            return
        worker.close_channel()
        if not worker.gone.wait(SHUTDOWN_GRACE):
            worker.kill()
            worker.gone.wait(SHUTDOWN_GRACE)
