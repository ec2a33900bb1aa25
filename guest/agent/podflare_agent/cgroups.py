"""The guest's cgroup v2 layout (Cgroups), managed by the control process: limits for
everything user code runs, a cgroup per exec that a timeout or cancel kills whole, and
the counters (OOM kills, pids limit hits) the scheduler reads."""

import ctypes
import os
import select
import signal
import threading
import time
import traceback

from .runtime import _pin_helper_thread, _write_proc_file, log
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
# mount(2) flags to keep when the cgroup2 mount is remounted with favordynmods.
_MS_REMOUNT = 32
_MOUNT_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "relatime": 1 << 21, "noatime": 1 << 10}
_CGROUP2_OPTIONS = {"nsdelegate", "memory_recursiveprot", "memory_localevents", "memory_hugetlb_accounting"}


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
                               waits in the next one (see WorkerSupervisor.park).

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
