"""The wire protocol (spec/guest-protocol.md): its constants and limits, the errors a
request can get, field checks, and framing (FrameParser, FrameWriter). Both processes speak
it: the control process to the host, the worker to the control process."""

import json
import os
import struct
import threading

from .runtime import log

VERSION = "1.1.0"
PROTOCOL = 1

MAGIC = b"PF\x01\x00"
PREAMBLE = 12  # magic + header_len + payload_len
MAX_HEADER = 64 << 10
MAX_PAYLOAD = 1 << 20
MAX_FRAME = PREAMBLE + MAX_HEADER + MAX_PAYLOAD
ID_LIMIT = 1 << 53

OUTPUT_FRAME = 64 << 10
DEFAULT_MAX_OUTPUT = 16 << 20
# An interrupted exec whose worker shows no sign of life (its SIGINT handler never runs:
# stuck in C code, SIGINT blocked or ignored) for this long is ended by killing the worker.
KILL_GRACE = 10.0
SHUTDOWN_GRACE = 2.0

READ_CHUNK = 256 << 10
MIN_WINDOW, MAX_WINDOW = 64 << 10, 64 << 20
MAX_QUEUED_EXECS = 64
MAX_UPLOADS = 32
MAX_DOWNLOADS = 16
MAX_PATH = 4096
MAX_MESSAGE = 2000
MAX_TRACEBACK = 6000  # with MAX_MESSAGE, an exit header stays < 64 KiB at 6 bytes/char


class RequestError(Exception):
    """A request the agent refuses; becomes an `error` reply with this protocol code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(header, key, lo, hi, nullable=False):
    value = header.get(key)
    if value is None and nullable:
        return None
    if not _is_int(value) or not lo <= value <= hi:
        raise RequestError("bad_request", f'"{key}" must be an integer in [{lo}, {hi}]' + (" or null" if nullable else ""))
    return value


def _str_field(header, key, pattern):
    value = header.get(key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise RequestError("bad_request", f'"{key}" must match {pattern.pattern}')
    return value


def _check_path(value):
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise RequestError("bad_path", '"path" must be an absolute path without NUL')
    try:
        encoded = os.fsencode(value)
    except UnicodeError:
        raise RequestError("bad_path", '"path" is not encodable') from None
    if len(encoded) > MAX_PATH:
        raise RequestError("bad_path", f'"path" is longer than {MAX_PATH} bytes')
    return value


def _clip(text, limit, keep_tail=False):
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if keep_tail else text[:limit] + "..."


def _safe_str(value):
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _utf8_cut(data, start, limit):
    """End index of at most `limit` bytes from `start` that does not split a character."""
    end = start + limit
    if end >= len(data):
        return len(data)
    while end > start and data[end] & 0xC0 == 0x80:
        end -= 1
    return end


class FrameParser:
    """Splits the incoming byte stream into frames and resynchronises on the magic.

    No I/O, so it is unit-testable; it holds at most one maximal frame.
    """

    def __init__(self):
        self._buf = bytearray()
        self._skipping = False  # inside a run of garbage that was reported already

    def room(self):
        return MAX_FRAME - len(self._buf)

    def reset(self):
        """Drops a partial frame: its sender went away."""
        self._buf.clear()
        self._skipping = False

    def feed(self, data):
        """Returns a list of ("frame", header_bytes, payload) and ("bad_frame", reason, None)."""
        events = []
        buf = self._buf
        buf += data
        while buf:
            if not buf.startswith(MAGIC):
                if MAGIC.startswith(buf):
                    break  # the beginning of a magic; wait for the rest
                if not self._skipping:
                    self._skipping = True
                    events.append(("bad_frame", "bad magic; resynchronising", None))
                start = buf.find(MAGIC, 1)
                if start < 0:
                    keep = next((k for k in (3, 2, 1) if buf.endswith(MAGIC[:k])), 0)
                    del buf[: len(buf) - keep]
                    break
                del buf[:start]
                continue
            if len(buf) < PREAMBLE:
                break
            header_len, payload_len = struct.unpack_from(">II", buf, 4)
            if not (2 <= header_len <= MAX_HEADER and payload_len <= MAX_PAYLOAD):
                # The lengths cannot be trusted, so neither can the frame's end.
                events.append(("bad_frame", f"frame lengths out of bounds (header {header_len}, payload {payload_len})", None))
                self._skipping = True
                del buf[:1]
                continue
            end = PREAMBLE + header_len + payload_len
            if len(buf) < end:
                break
            events.append(("frame", bytes(buf[PREAMBLE : PREAMBLE + header_len]), bytes(buf[PREAMBLE + header_len : end])))
            del buf[:end]
            self._skipping = False
        return events


class FrameWriter:
    """Writes frames; one lock keeps frames from concurrent senders whole."""

    def __init__(self, fd):
        self._fd = fd
        self._lock = threading.Lock()
        self._failing = False

    @staticmethod
    def encode(header, payload=b""):
        # ensure_ascii=False keeps text compact (<= 6 bytes a character in the worst case);
        # 'backslashreplace' writes a lone surrogate as \udcxx, which is its JSON escape.
        head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")
        if len(head) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
            raise ValueError(f"outgoing {header.get('type')} frame exceeds the protocol limits")
        return b"".join((MAGIC, struct.pack(">II", len(head), len(payload)), head, payload))

    def send(self, header, payload=b""):
        return self.send_encoded(self.encode(header, payload))

    def send_encoded(self, data):
        """Writes already-encoded frames in one go: under emulation every write to the
        port costs a device notification, so frames that leave together are joined."""
        with self._lock:
            try:
                _write_all(self._fd, data)
            except OSError as exc:
                if not self._failing:
                    log(f"cannot send to the host: {exc}")
                self._failing = True
                return False
            self._failing = False
        return True
