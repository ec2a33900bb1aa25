"""Fuzzing of the guest side of the agent protocol, standard library only.

1. The agent's FrameParser, in-process: random byte streams cut at random places, valid
   frames, hostile lengths. It must never raise, never hold more than one maximal frame,
   decode the same frames however the stream is chunked, and find a good frame again
   after garbage (resynchronisation at the next magic).
2. The real agent as a subprocess over a socket pair (as test_agent.py runs it), fed
   requests with hostile headers and payloads. It must answer with well-formed frames and
   protocol error codes, never report an internal error (a handler bug), stay responsive,
   keep its REPL, and exit cleanly when the channel closes.

Seeded: PODFLARE_FUZZ_SEED=<n> reproduces a run (the seed is printed); PODFLARE_FUZZ_SCALE
multiplies the iteration counts.
Run: cd guest/agent && python3 -m unittest tests.test_fuzz -v
"""

import json
import os
import random
import struct
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from podflare_agent import protocol  # noqa: E402
from frames import MAGIC, AgentProcess, encode  # noqa: E402

SEED = int(os.environ.get("PODFLARE_FUZZ_SEED", "20260611"))
SCALE = float(os.environ.get("PODFLARE_FUZZ_SCALE", "1"))
print(f"guest agent fuzz: seed {SEED} (PODFLARE_FUZZ_SEED to reproduce)", file=sys.stderr)

PREAMBLE = 12
MAX_HEADER = 64 << 10
MAX_PAYLOAD = 1 << 20
MAX_FRAME = PREAMBLE + MAX_HEADER + MAX_PAYLOAD
ERROR_CODES = {"bad_frame", "bad_request", "unsupported_version", "not_found", "is_directory", "bad_path", "not_a_file", "io_error", "no_space", "busy", "unknown_transfer", "too_large"}


def n(count):
    return max(1, int(count * SCALE))


def raw_frame(header_bytes, payload=b"", header_len=None, payload_len=None):
    hl = len(header_bytes) if header_len is None else header_len
    pl = len(payload) if payload_len is None else payload_len
    return MAGIC + struct.pack(">II", hl, pl) + header_bytes + payload


def without_magic(data):
    return data.replace(MAGIC, b"PF\x01\x01")


def chunks(rng, data, max_piece=None):
    """`data` cut at random places."""
    out = []
    at = 0
    while at < len(data):
        size = rng.randint(1, max_piece or max(1, len(data)))
        out.append(data[at : at + size])
        at += size
    return out or [b""]


def feed_all(parser, pieces):
    """Feeds like the agent's reader (never more than room()); checks the bound after each."""
    events = []
    for piece in pieces:
        while piece:
            room = parser.room()
            assert room > 0, "the parser has no room although it holds no complete frame"
            events += parser.feed(piece[:room])
            piece = piece[room:]
            assert MAX_FRAME - parser.room() <= MAX_FRAME
    return events


class Soup:
    """Hostile byte streams built from a seeded generator."""

    def __init__(self, rng):
        self.rng = rng

    def garbage(self):
        rng = self.rng
        kind = rng.randrange(4)
        if kind == 0:
            return rng.randbytes(rng.randint(0, 300))
        if kind == 1:  # the magic's own alphabet: partial and overlapping magics
            return bytes(rng.choice(b"PF\x01\x00\xff") for _ in range(rng.randint(0, 64)))
        if kind == 2:
            return MAGIC[: rng.randint(1, 3)]
        return b"\x00" * rng.randint(0, 2000)

    def header(self):
        rng = self.rng
        kind = rng.randrange(8)
        if kind == 0:
            return rng.randbytes(rng.randint(2, 80))
        if kind == 1:
            return b"[" * rng.randint(2, 30000)
        if kind == 2:
            depth = rng.randint(2, 10000)
            return b'{"a":' * depth + b"1" + b"}" * depth
        if kind == 3:
            return rng.choice([b"{not json", b"[1]", b'"s"', b"{}", b"null", b'{"type":5}', b"\xff\xfe{}", b'{"type":"ping","id":1,}'])
        header = {"type": rng.choice(["ping", "hello", "exec", "nope", "", "x" * 70]), "id": rng.choice([1, 2, 0, -1, 1.5, 2**53, "1", None, True])}
        return json.dumps(header).encode()

    def bad_lengths(self):
        rng = self.rng
        hl = rng.choice([0, 1, MAX_HEADER + 1, 0xFFFFFFFF, rng.randint(0, 0xFFFFFFFF)])
        pl = rng.choice([MAX_PAYLOAD + 1, 0xFFFFFFFF, rng.randint(0, 0xFFFFFFFF)])
        if 2 <= hl <= MAX_HEADER and pl <= MAX_PAYLOAD:
            pl = MAX_PAYLOAD + 1
        return MAGIC + struct.pack(">II", hl, pl) + self.rng.randbytes(rng.randint(0, 20))

    def piece(self):
        kind = self.rng.randrange(5)
        if kind == 0:
            return self.garbage()
        if kind == 1:
            return self.bad_lengths()
        if kind == 2:
            return raw_frame(self.header(), self.rng.randbytes(self.rng.randint(0, 100)))
        if kind == 3:  # a valid-looking preamble whose frame may be cut short by what follows
            return raw_frame(self.header()[: self.rng.randint(0, 40)], b"", header_len=self.rng.randint(2, 200), payload_len=self.rng.randint(0, 200))
        return encode({"type": "pong", "id": self.rng.randint(1, 2**53 - 1)}, self.rng.randbytes(self.rng.randint(0, 50)))


class FrameParserFuzz(unittest.TestCase):
    def setUp(self):
        self.rng = random.Random(f"{SEED}-{self.id()}")
        self.soup = Soup(self.rng)

    def test_random_streams_never_raise_and_stay_bounded(self):
        for _ in range(n(1500)):
            parser = protocol.FrameParser()
            data = b"".join(self.soup.piece() for _ in range(self.rng.randint(0, 12)))
            for kind, first, payload in feed_all(parser, chunks(self.rng, data, 200)):
                self.assertIn(kind, ("frame", "bad_frame"))
                if kind == "frame":
                    self.assertTrue(2 <= len(first) <= MAX_HEADER)
                    self.assertLessEqual(len(payload), MAX_PAYLOAD)
                else:
                    self.assertIsInstance(first, str)
                    self.assertIsNone(payload)

    def test_chunking_does_not_change_the_frames(self):
        for _ in range(n(800)):
            data = b"".join(self.soup.piece() for _ in range(self.rng.randint(0, 10)))
            whole = [e for e in protocol.FrameParser().feed(data) if e[0] == "frame"]
            cut = [e for e in feed_all(protocol.FrameParser(), chunks(self.rng, data, 50)) if e[0] == "frame"]
            self.assertEqual(cut, whole)

    def test_valid_frames_round_trip(self):
        for _ in range(n(500)):
            frames = []
            for _ in range(self.rng.randint(1, 8)):
                header = {"type": "".join(self.rng.choice("abcxyz_") for _ in range(self.rng.randint(1, 20))), "id": self.rng.randint(1, 2**53 - 1), "s": "é\u2603\U0001f600" * self.rng.randint(0, 5)}
                frames.append((json.dumps(header).encode(), self.rng.randbytes(self.rng.randint(0, 3000))))
            data = b"".join(raw_frame(h, p) for h, p in frames)
            parser = protocol.FrameParser()
            events = feed_all(parser, chunks(self.rng, data, 100))
            self.assertEqual(events, [("frame", h, p) for h, p in frames])
            self.assertEqual(parser.room(), MAX_FRAME)

    def test_good_frame_after_garbage_is_understood(self):
        for i in range(n(1000)):
            junk = []
            for _ in range(self.rng.randint(0, 6)):
                kind = self.rng.randrange(3)
                if kind == 0:
                    junk.append(without_magic(self.soup.garbage()))
                elif kind == 1:
                    junk.append(raw_frame(self.soup.header(), self.rng.randbytes(self.rng.randint(0, 40))))
                else:
                    junk.append(self.soup.bad_lengths()[:PREAMBLE])
            good = encode({"type": "ping", "id": i + 1}, b"ok")
            parser = protocol.FrameParser()
            events = feed_all(parser, chunks(self.rng, b"".join(junk) + good, 64))
            frames = [e for e in events if e[0] == "frame"]
            self.assertEqual(frames[-1], ("frame", json.dumps({"type": "ping", "id": i + 1}).encode(), b"ok"))
            self.assertEqual(parser.room(), MAX_FRAME)

    def test_maximal_frames_and_lengths_one_past(self):
        parser = protocol.FrameParser()
        big = raw_frame(b"{" + b" " * (MAX_HEADER - 2) + b"}", b"\x01" * MAX_PAYLOAD)
        events = feed_all(parser, chunks(self.rng, big, 300_000))
        self.assertEqual([(k, len(f), len(p)) for k, f, p in events], [("frame", MAX_HEADER, MAX_PAYLOAD)])
        over = MAGIC + struct.pack(">II", MAX_HEADER, MAX_PAYLOAD + 1) + b"\x00" * 100
        events = feed_all(parser, [over, encode({"type": "ping", "id": 1})])
        self.assertEqual([k for k, _, _ in events], ["bad_frame", "frame"])


class HostileRequests:
    """Requests with hostile headers and payloads, never touching files outside `root`."""

    VALUES = [None, True, False, 0, -1, 1, 1.5, -0.0, 2**53, 2**64, 1e308, "", "x", "1", "\u0000", "../", "a" * 5000, [], [1, [2, [3]]], {}, {"a": {"b": {}}}, "\udcff"]

    def __init__(self, rng, root, next_id):
        self.rng = rng
        self.root = root
        self.next_id = next_id
        self.sent_ids = []

    def value(self):
        return self.rng.choice(self.VALUES)

    def rid(self):
        rng = self.rng
        r = rng.random()
        if r < 0.6:
            rid = self.next_id()
            self.sent_ids.append(rid)
            return rid
        if r < 0.75 and self.sent_ids:
            return rng.choice(self.sent_ids)  # an id already used: a duplicate or a reply to nothing
        return rng.choice([0, -1, 1.5, 2**53, 2**63, "7", None, True, [1], {"id": 1}])

    def path(self):
        rng = self.rng
        return rng.choice(
            [
                os.path.join(self.root, "f%d" % rng.randrange(4)),
                os.path.join(self.root, "sub", "..", "g"),
                self.root,
                os.path.join(self.root, "missing", "x"),
                "relative/path",
                "",
                "/",
                self.root + "/\u0000x",
                self.root + "/" + "d" * 5000,
                self.root + "/\udcff",
                5,
                None,
                ["/etc/passwd"],
            ]
        )

    def request(self):
        """(header dict, payload bytes)."""
        rng = self.rng
        kind = rng.choice(["ping", "hello", "exec", "cancel", "write_begin", "write_chunk", "write_end", "write_abort", "read", "read_ack", "read_abort", "restore", "stat_tree", "nope", "output", "exit", "started"])
        header = {"type": kind, "id": self.rid()}
        if rng.random() < 0.1:
            del header["id"]
        payload = b""
        if kind == "hello":
            header["version"] = rng.choice([1, 2, 0, "1", None, 1.0, True])
        elif kind == "exec":
            header["language"] = rng.choice(["python", "python", "bash", "ruby", None, 5, ["python"]])
            for field in ("timeout_ms", "max_output_bytes"):
                if rng.random() < 0.7:
                    header[field] = rng.choice([None, 1, 1000, 0, -5, 1.5, "9", 2**53, True, {}])
            # Only harmless code: the agent runs on this machine, not in a VM.
            payload = rng.choice([b"", b"1", b"print(1)", b"x" * 3000, b"\xff\xfe", b"\x00", b"raise SystemExit(3)", b"import sys; sys.stderr.write('e')", "'\u2603' * 3".encode(), b"true", b"exit 4"])
        elif kind == "cancel":
            header["target"] = rng.choice([*self.sent_ids[-5:], self.value()]) if self.sent_ids else self.value()
        elif kind == "write_begin":
            header["path"] = self.path()
            if rng.random() < 0.5:
                header["mode"] = rng.choice([None, 0o644, 0o7777, -1, 2**40, "644", 1.5])
        elif kind == "write_chunk":
            payload = rng.randbytes(rng.randint(0, 2000))
        elif kind == "write_end":
            header["size"] = rng.choice([0, 1, 3, -1, 2**60, "3", None, 1.5])
        elif kind == "read":
            header["path"] = self.path()
            header["window"] = rng.choice([64 << 10, 1 << 20, 0, -1, 2**60, "x", None, 1.5])
        elif kind == "read_ack":
            header["bytes"] = rng.choice([0, 1 << 20, -1, 2**60, "x", None])
        elif kind == "restore":
            header.update(
                entropy=rng.choice(["AAAA", "A" * 44, "not base64!", 5, None, "A" * 10000]),
                time_ns=rng.choice([0, -1, 2**70, "1", None]),
                hostname=rng.choice(["ok-name", "Bad_Name", "", "a" * 64, 7]),
                machine_id=rng.choice(["0" * 32, "z" * 32, "", 5]),
            )
        for _ in range(rng.randrange(3)):
            header[rng.choice(["extra", "code", "stream", "path", "language", "size", "id", "type"])] = self.value()
        return header, payload


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


class AgentDispatchFuzz(unittest.TestCase):
    def setUp(self):
        self.rng = random.Random(f"{SEED}-{self.id()}")
        self.agent = AgentProcess()
        self.addCleanup(self._stop_agent)
        self.ch = self.agent.channel
        self._ids = iter(range(1000, 2**31))  # the soup uses ids 1 and 2
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        os.mkdir(os.path.join(self.dir.name, "sub"))
        with open(os.path.join(self.dir.name, "f0"), "wb") as f:
            f.write(b"small file")
        self.frames_seen = 0

    def _stop_agent(self):
        self.assertEqual(self.agent.close(), 0, "the agent must exit cleanly on EOF")

    def new_id(self):
        return next(self._ids)

    def check_frame(self, header, payload):
        """Whatever the agent sends is a well-formed protocol frame."""
        self.frames_seen += 1
        self.assertIsInstance(header, dict)
        self.assertIsInstance(header.get("type"), str, header)
        rid = header.get("id")
        self.assertTrue(rid is None or (_is_int(rid) and 1 <= rid < 2**53), header)
        if header["type"] == "error":
            self.assertIn(header.get("code"), ERROR_CODES, header)
            self.assertIsInstance(header.get("message"), str)
            self.assertFalse(header["message"].startswith("internal error"), f"a handler raised: {header}")
        if header["type"] == "output":
            self.assertIn(header.get("stream"), ("stdout", "stderr"))
            payload.decode("utf-8")  # whole characters only
        if header["type"] == "exit":
            self.assertTrue(_is_int(header.get("code")), header)

    def settle(self, timeout=60.0):
        """Waits until everything sent so far has been handled: a ping on the reader thread,
        then an exec behind every queued exec. Returns the frames seen meanwhile."""
        seen = []
        ping = self.new_id()
        self.ch.send({"type": "ping", "id": ping})
        exec_id = self.new_id()
        self.ch.send({"type": "exec", "id": exec_id, "language": "python", "timeout_ms": None, "max_output_bytes": None}, b"print('settled')")
        deadline = time.monotonic() + timeout
        got_pong = False
        out = b""
        while True:
            header, payload = self.ch.recv(max(0.01, deadline - time.monotonic()))
            self.check_frame(header, payload)
            if header == {"type": "pong", "id": ping}:
                got_pong = True
            elif header.get("id") == exec_id and header["type"] == "output":
                out += payload
            elif header.get("id") == exec_id and header["type"] == "exit":
                self.assertEqual((header["code"], out), (0, b"settled\n"), header)
                self.assertTrue(got_pong)
                return seen
            elif header.get("type") == "data" and header.get("id") is not None:
                pass
            else:
                seen.append(header)

    def test_hostile_requests(self):
        gen = HostileRequests(self.rng, self.dir.name, self.new_id)
        sent = 0
        for _ in range(n(400)):
            batch = b""
            for _ in range(self.rng.randint(1, 10)):
                header, payload = gen.request()
                batch += encode(header, payload)
                sent += 1
            for piece in chunks(self.rng, batch, 4096):
                self.ch.send_raw(piece)
            self.settle()
        self.assertGreater(sent, 100)
        # Nothing was written outside the temporary directory, and the REPL still works.
        self.assertEqual(self.run_python("print(6 * 7)"), b"42\n")

    def test_hostile_headers(self):
        soup = Soup(self.rng)
        for _ in range(n(300)):
            batch = b""
            for _ in range(self.rng.randint(1, 6)):
                batch += raw_frame(soup.header(), self.rng.randbytes(self.rng.randint(0, 200)))
            self.ch.send_raw(batch)
            self.settle()
        self.assertEqual(self.run_python("print('alive')"), b"alive\n")

    def test_byte_soup_then_resync(self):
        """Random streams, then enough filler to complete whatever frame the soup left open
        (at most one maximal frame), then garbage: the agent resynchronises and answers."""
        soup = Soup(self.rng)
        for i in range(n(50)):
            soup_bytes = b"".join(soup.piece() for _ in range(self.rng.randint(1, 15)))
            self.ch.send_raw(soup_bytes)
            if i % 5 == 4:
                self.ch.send_raw(b"\x00" * MAX_FRAME)  # closes any frame left open
            self.ch.send_raw(b"\xff" * 16)
            if i % 5 == 4:
                self.settle()
        self.assertEqual(self.run_python("print('alive')"), b"alive\n")

    def run_python(self, code):
        rid = self.new_id()
        self.ch.send({"type": "exec", "id": rid, "language": "python", "timeout_ms": 10000, "max_output_bytes": None}, code.encode())
        out = b""
        while True:
            header, payload = self.ch.recv(30)
            self.check_frame(header, payload)
            if header.get("id") != rid:
                continue
            if header["type"] == "output":
                out += payload
            elif header["type"] == "exit":
                return out


if __name__ == "__main__":
    unittest.main()
