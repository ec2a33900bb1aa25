"""Host side of the guest protocol, just enough to drive the agent in tests."""

import json
import os
import socket
import struct
import subprocess
import sys
import time

MAGIC = b"PF\x01\x00"
# The package directory: `python3 <dir>` runs it, as init does in the guest.
AGENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "podflare_agent")


def encode(header, payload=b""):
    head = json.dumps(header).encode("utf-8") if isinstance(header, dict) else header
    return MAGIC + struct.pack(">II", len(head), len(payload)) + head + payload


class Channel:
    """Frame I/O over the host end of the socket pair."""

    def __init__(self, sock):
        self.sock = sock
        self._buf = bytearray()

    def send(self, header, payload=b""):
        self.sock.sendall(encode(header, payload))

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv(self, timeout=10.0):
        """The next frame as (header dict, payload); TimeoutError if none arrives in time."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) >= 12:
                if self._buf[:4] != MAGIC:
                    raise AssertionError(f"agent sent bad magic: {bytes(self._buf[:16])!r}")
                header_len, payload_len = struct.unpack_from(">II", self._buf, 4)
                end = 12 + header_len + payload_len
                if len(self._buf) >= end:
                    header = json.loads(self._buf[12 : 12 + header_len])
                    payload = bytes(self._buf[12 + header_len : end])
                    del self._buf[:end]
                    return header, payload
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame from the agent")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                raise TimeoutError("no frame from the agent") from None
            if not data:
                raise EOFError("agent closed the channel")
            self._buf += data

    def nothing_within(self, seconds):
        """True if no frame arrives within `seconds`."""
        try:
            header, _ = self.recv(timeout=seconds)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected frame {header}")


class AgentProcess:
    """The agent as a subprocess, talking over a socket pair (--fd)."""

    def __init__(self, preexec_fn=None, extra_args=()):
        host, guest = socket.socketpair()
        stderr = None if os.environ.get("PODFLARE_TEST_AGENT_LOG") else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, AGENT, "--fd", str(guest.fileno()), "--skip-system-restore", *extra_args],
            pass_fds=[guest.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=preexec_fn,
        )
        guest.close()
        self.sock = host
        self.channel = Channel(host)
        self.started, _ = self.channel.recv()  # the unsolicited first frame

    def close(self):
        """Closes the channel; returns the agent's exit code (it must leave on its own)."""
        self.sock.close()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
