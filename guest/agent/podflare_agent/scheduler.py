"""The control process's exec scheduler (ExecScheduler, on the main thread): the queue of
execs, one at a time on the REPL worker; timeouts, cancels and the kill of a stuck
worker; per-exec cgroups; relaying and re-checking the worker's frames; and when a
worker is needed (WorkerSupervisor starts, parks and replaces it)."""

import json
import threading
import time
import traceback

from .cgroups import PIDS_MAX, SWEEP_INTERVAL, SWEEP_PASSES
from .execqueue import ExecQueue
from .protocol import KILL_GRACE, MAX_MESSAGE, MAX_TRACEBACK, OUTPUT_FRAME, FrameWriter, _clip, _is_int, _utf8_cut
from .runtime import _pin_helper_thread, log
from .supervisor import WorkerSupervisor, _death_cause


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


class ExecScheduler(ExecQueue):
    """Runs execs one at a time on the REPL worker (the dispatcher is the main thread):
    owns the queue, timeouts, cancels and per-exec cgroups; the worker's life is its
    WorkerSupervisor's (supervisor.py), under the same lock."""

    def __init__(self, writer, cgroups, worker_argv, kill_grace=KILL_GRACE):
        super().__init__()
        self._writer = writer
        self._cgroups = cgroups
        self._kill_grace = kill_grace
        self._workers = WorkerSupervisor(self._cond, cgroups, worker_argv, self._from_worker, self._worker_died)
        self._restart_note = None  # told (stderr) to the next exec: the REPL died while idle
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
        self._workers.reseed()

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
        parked = self._workers.parked  # holds the idle worker: never a candidate
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
            self._workers.stop()
            self.stopped.set()

    def _next_job(self):
        while True:
            park = None
            with self._cond:
                while True:
                    if self._closing:
                        return None
                    worker = self._workers.current
                    if worker is None:
                        delay = self._workers.respawn_at - time.monotonic()
                        if delay <= 0:
                            break
                        self._cond.wait(delay)
                    elif worker.ready_at is not None and self._queue:
                        job = self._queue.popleft()
                        job.worker = worker
                        self._current = job
                        return job
                    elif worker.ready_at is not None and self._workers.needs_park(worker):
                        park = worker  # a new worker: into its first exec cgroup before any exec
                        break
                    else:
                        self._cond.wait()
            if park is not None:
                self._workers.park(park)
            else:
                self._workers.spawn()

    def _run(self, job):
        cg = self._cgroups
        worker = job.worker
        job.oom_before = cg.oom_kills()
        job.pids_before = cg.pids_limit_hits()
        parked = self._workers.take_parked()
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
                self._workers.park(worker)
            return
        if not worker.dead and job.interrupted_at is None:
            self._workers.park(worker)  # out of the call's cgroup, into the next one
        if job.interrupted_at is not None or worker.dead or job.kill_leftovers:
            cg.kill(job.cgroup)
        if job.interrupted_at is not None and not worker.dead:
            self._sweep(job, SWEEP_PASSES)
            self._workers.park(worker)  # from user/repl, where _interrupt put it
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
            self._workers.died(worker, now)
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
