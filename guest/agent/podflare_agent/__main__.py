"""Entry point of both agent processes: `python3 -m podflare_agent [options]`, or
`python3 /opt/podflare/podflare_agent [options]` (the package directory: how init starts
the control process and the control process its REPL worker, `--worker --fd N`)."""

import argparse
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a directory: sys.path[0] is the package itself. Its parent is what lets the
    # package import itself (the worker hands sys.path[0] on to user code as "").
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

from podflare_agent import runtime  # noqa: E402
from podflare_agent.cgroups import CGROUP_ROOT  # noqa: E402
from podflare_agent.protocol import KILL_GRACE  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(prog="podflare_agent", description="podflare guest agent")
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

    for std_fd in (0, 1, 2):  # open the lowest free fd, so pipes never land on 0..2
        try:
            os.fstat(std_fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    runtime.set_log(fd=os.dup(2))  # diagnostics stay off the captured fds 1 and 2
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    sys.stdin = open(os.devnull, encoding="utf-8")
    if args.worker:
        from podflare_agent.worker import worker_main  # none of the control process's own modules

        worker_main(args)
        return
    from podflare_agent.dispatch import control_main

    control_main(args)


if __name__ == "__main__":
    main()
