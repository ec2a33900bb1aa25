"""The REPL worker process (`--worker`): runs user code on its main thread (ExecRunner:
the cell's namespace, compilation, tracebacks, interrupts as KeyboardInterrupt, bash
calls) and talks only to the control process over its socket (WorkerChannel)."""

import ast
import builtins
import json
import linecache
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
import types

from .execqueue import ExecQueue
from .output import CapturedStream, FdCapture, OutputCollector
from .protocol import MAX_MESSAGE, MAX_TRACEBACK, SHUTDOWN_GRACE, FrameParser, FrameWriter, _clip, _is_int, _safe_str, _write_all
from . import runtime
from .runtime import _in_forked_child, _pin_helper_thread, _set_affinity, _write_proc_file, log

KICK_INTERVAL = 1.0  # SIGINT is repeated while code swallows KeyboardInterrupt
# The agent's own code: every module of this package (tracebacks leave its frames out).
_AGENT_DIR = os.path.dirname(os.path.abspath(__file__))
# The directory the package is in: the worker's sys.path[0] when it starts.
_AGENT_HOME = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

_interrupt_pending = False  # the running exec is being interrupted: its forks die at birth


REAP_WINDOW = 1.0  # seconds after an interrupted exec in which execs reap killed children


def _reap_killed_children():
    """Reaps this process's children that died of SIGKILL: processes that user code
    started in the REPL (os.fork, subprocess.Popen) and that the control process killed
    at a timeout or cancel. As zombies they would each hold one of the sandbox's pids
    (pids.max) for as long as the REPL lives, and user code cannot use them any more. A
    child that exited by itself, or is still running, is left for user code to wait on
    (a Popen whose killed process was reaped here reports returncode 0)."""
    pids = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(pid) for pid in f.read().split())
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None and info.si_code == os.CLD_KILLED and info.si_status == signal.SIGKILL:
                os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # user code reaped it meanwhile
            pass


def _is_agent_file(filename):
    return os.path.dirname(filename) == _AGENT_DIR


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
        if not _is_agent_file(tb.tb_frame.f_code.co_filename):
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


class ExecRunner(ExecQueue):
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
        # After an interrupted exec: until then (monotonic s), each exec first reaps the
        # children the control process killed (its kill lands just after the exit frame).
        self._reap_until = 0.0
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
        if self._reap_until:
            _reap_killed_children()
            if time.monotonic() >= self._reap_until:
                self._reap_until = 0.0
        _interrupt_pending = job.reason is not None
        self._collector.begin(job.id, job.max_output)
        try:
            result = self._run_python(job) if job.language == "python" else self._run_bash(job)
        except Exception as exc:  # an agent bug: the exec still ends with exactly one exit
            log(f"exec {job.id}: {traceback.format_exc()}")
            result = {"code": 1, "error": _error_info(exc, "")}
        if job.reason is not None:
            # The control process kills what this exec started once its exit is sent: the
            # execs of the next second reap those of them that were this process's children.
            self._reap_until = time.monotonic() + REAP_WINDOW
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
        if _is_agent_file(frame.f_code.co_filename):
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


def worker_main(args):
    """The REPL worker: runs user code; talks only to the control process (fd `args.fd`)."""
    runtime.set_log(prefix="podflare-agent[worker]")
    runtime.set_worker_pid(os.getpid())
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
    if sys.path and os.path.realpath(sys.path[0]) == _AGENT_HOME:
        sys.path[0] = ""  # as in the interactive interpreter: imports see the cwd
    runner.install()
    collector.start()
    capture.start()
    writer.send({"type": "ready", "id": None, "pid": os.getpid()})
    threading.Thread(target=WorkerChannel(fd, writer, runner).read_loop, name="podflare-channel", daemon=True).start()
    runner.run_forever()
    os._exit(0)  # user threads may still run and must not keep the process alive
