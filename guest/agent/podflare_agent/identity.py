"""A sandbox's own identity after a boot or a restore from a snapshot (the `restore`
request): fresh entropy mixed into the kernel CRNG, the clock, the hostname (and its
/etc/hosts line) and /etc/machine-id. The REPL's `random` is reseeded by the worker."""

import base64
import fcntl
import os
import re
import socket
import struct
import time

from .protocol import RequestError, _int_field, _str_field

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
HOSTNAME_RE = re.compile(r"[a-z0-9-]{1,63}")
MACHINE_ID_RE = re.compile(r"[0-9a-f]{32}")


def parse_restore(header):
    """The checked fields of a restore request: (entropy, time_ns, hostname, machine_id)."""
    try:
        entropy = base64.b64decode(header.get("entropy"), validate=True)
    except (TypeError, ValueError):
        entropy = b""
    if not 32 <= len(entropy) <= 512:
        raise RequestError("bad_request", '"entropy" must be base64 of 32..512 bytes')
    time_ns = _int_field(header, "time_ns", 0, (1 << 63) - 1)
    hostname = _str_field(header, "hostname", HOSTNAME_RE)
    machine_id = _str_field(header, "machine_id", MACHINE_ID_RE)
    return entropy, time_ns, hostname, machine_id


def restore_system(entropy, time_ns, hostname, machine_id):
    """Runs every step, each best-effort; returns the failures ("step: error")."""
    failures = []
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
    return failures


def rand_pool_info(entropy):
    """struct rand_pool_info for RNDADDENTROPY: entropy_count (bits), buf_size, buf."""
    return struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy


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
