"""Process-wide bits of both agent processes: the diagnostic log, CPU affinity of the
helper threads, /proc writes, and which process is the REPL worker (its forks are not)."""

import os

_log_fd = 2  # main() points this at a dup of the original stderr (the console)
_log_prefix = "podflare-agent"
_worker_pid = None  # set in the worker; a process with another pid is a fork of it


def set_log(fd=None, prefix=None):
    global _log_fd, _log_prefix
    if fd is not None:
        _log_fd = fd
    if prefix is not None:
        _log_prefix = prefix


def set_worker_pid(pid):
    global _worker_pid
    _worker_pid = pid


def _in_forked_child():
    return _worker_pid is not None and os.getpid() != _worker_pid


def log(message):
    try:
        os.write(_log_fd, f"{_log_prefix}: {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass


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
