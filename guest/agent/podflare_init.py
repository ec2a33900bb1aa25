#!/usr/bin/python3
"""PID 1 of a podflare guest.

The initramfs switch_root's into `/usr/bin/python3 -I -S /opt/podflare/podflare_init.py`
with /dev already mounted. This mounts the API file systems (cgroup2 included), brings up
lo, then runs the guest agent and reaps every process of the guest (orphans are
reparented to PID 1), respawning the agent whenever it exits. PID 1 exiting panics the kernel, so every setup
step is best-effort and logged, and the supervisor loop survives any exception.
Standard library only; ctypes' mount(2) avoids forking util-linux for each mount.
"""

import ctypes
import fcntl
import os
import signal
import socket
import struct
import time

PYTHON = "/usr/bin/python3"
AGENT = "/opt/podflare/podflare_agent"  # the package directory: python3 runs its __main__.py
HOSTNAME = "sandbox"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}

MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MOUNTS = (  # source, target, type, flags, options; in order (/dev/pts needs /dev)
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    # The agent lays out its cgroups here (podflare_agent.cgroups): user code runs under
    # memory and pids limits, in a cgroup per call that a timeout can kill whole.
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),  # gid 5: tty
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
)
# devtmpfs lacks these (udev makes them elsewhere); bash needs /dev/fd for <(...).
DEV_LINKS = (("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"), ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr"))
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in a 24-byte union
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
STABLE_AFTER = 10.0  # an agent that ran this long resets the backoff

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_console = -1


def log(message):
    global _console
    line = f"podflare-init: {message}\n".encode("utf-8", "replace")
    try:
        if _console < 0:
            _console = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        os.write(_console, line)
    except OSError:
        try:
            os.write(2, line)
        except OSError:
            pass


def ensure_std_fds():
    """Opens fds 0-2 if the kernel found no console to give us; the agent inherits 1 and 2."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            for path in ("/dev/console", "/dev/null"):
                try:
                    os.open(path, os.O_RDWR | os.O_NOCTTY)  # lowest free fd: this one
                    break
                except OSError:
                    continue


def mount_all():
    for source, target, fstype, flags, options in MOUNTS:
        if os.path.ismount(target):
            continue  # /dev comes mounted from the initramfs
        os.makedirs(target, exist_ok=True)
        if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, options.encode() or None) != 0:
            log(f"mount {fstype} on {target}: {os.strerror(ctypes.get_errno())}")
    for target, link in DEV_LINKS:
        if not os.path.lexists(link):
            os.symlink(target, link)


def loopback_up():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _, flags = IFREQ.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, IFREQ.pack(b"lo", 0)))
        # The kernel gives lo 127.0.0.1/8 and ::1 as it comes up.
        fcntl.ioctl(sock, SIOCSIFFLAGS, IFREQ.pack(b"lo", flags | IFF_UP))


def set_hostname():
    socket.sethostname(HOSTNAME)


def set_process_state():
    os.environ.clear()  # drop what the kernel passed (TERM, BOOT_IMAGE, ...)
    os.environ.update(ENV)
    os.makedirs(ENV["HOME"], exist_ok=True)
    os.chdir(ENV["HOME"])


def spawn_agent():
    try:
        pid = os.posix_spawn(
            PYTHON,
            [PYTHON, "-u", AGENT],
            dict(os.environ),
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)],
            # PID 1 ignores SIGINT (and Python SIGPIPE, SIGXFSZ); user code expects defaults.
            setsigdef=signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP},
        )
    except OSError as exc:
        log(f"cannot start the agent: {exc}")
        return None
    log(f"agent started pid={pid}")
    return pid


def describe(status):
    code = os.waitstatus_to_exitcode(status)
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def supervise():
    backoff = BACKOFF_MIN
    while True:
        agent = spawn_agent()
        started = time.monotonic()
        while agent is not None:
            try:
                pid, status = os.wait()  # also reaps every orphan of the guest
            except ChildProcessError:
                break
            if pid == agent:
                log(f"agent pid={agent} {describe(status)}")
                break
        if time.monotonic() - started >= STABLE_AFTER:
            backoff = BACKOFF_MIN
        time.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)


def main():
    if os.getpid() != 1:
        raise SystemExit("podflare-init: must run as PID 1 (it mounts file systems and reaps orphans)")
    os.closerange(3, 1 << 20)  # whatever the initramfs left open must not reach user code
    # Ctrl-Alt-Del and the like send SIGINT to PID 1; a KeyboardInterrupt would kill it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.umask(0o022)
    # ensure_std_fds twice: /dev/console may only exist once /dev is mounted.
    for step in (ensure_std_fds, mount_all, ensure_std_fds, loopback_up, set_hostname, set_process_state):
        try:
            step()
        except Exception as exc:
            log(f"{step.__name__}: {exc!r}")
    while True:
        try:
            supervise()
        except BaseException as exc:  # never exit: PID 1
            log(f"supervisor: {exc!r}")
            time.sleep(1)


if __name__ == "__main__":
    main()
