"""Tests of the guest agent: the real agent as a subprocess over a socket pair (--fd).

Run: cd guest/agent && python3 -m unittest discover -s tests -v
"""

import base64
import errno
import itertools
import os
import random
import resource
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from podflare_agent import cgroups, dispatch, files, identity, output, protocol, worker  # noqa: E402  (in-process tests of the pure parts)
from frames import MAGIC, AgentProcess, Channel, encode  # noqa: E402


class Result:
    def __init__(self, events, exit_header):
        self.events = events  # [(stream, text)], consecutive same-stream writes merged
        self.exit = exit_header
        self.stdout = "".join(text for stream, text in events if stream == "stdout")
        self.stderr = "".join(text for stream, text in events if stream == "stderr")
        self.code = exit_header["code"]


class AgentCase(unittest.TestCase):
    preexec_fn = None  # runs in the agent's process before it starts
    extra_args = ()

    def setUp(self):
        self.agent = AgentProcess(preexec_fn=type(self).preexec_fn, extra_args=self.agent_args())
        self.addCleanup(self._stop_agent)
        self.ch = self.agent.channel
        self._ids = itertools.count(1)

    def agent_args(self):
        return type(self).extra_args

    def _stop_agent(self):
        self.assertEqual(self.agent.close(), 0, "the agent must exit cleanly on EOF")

    def new_id(self):
        return next(self._ids)

    def recv(self, timeout=10.0):
        return self.ch.recv(timeout)

    def request(self, kind, payload=b"", **fields):
        """Sends one request and returns its reply header (which must carry the id)."""
        rid = self.new_id()
        self.ch.send({"type": kind, "id": rid, **fields}, payload)
        header, _ = self.recv()
        self.assertEqual(header.get("id"), rid, header)
        return header

    def start(self, code, language="python", timeout_ms=None, max_output_bytes=None):
        rid = self.new_id()
        header = {"type": "exec", "id": rid, "language": language, "timeout_ms": timeout_ms, "max_output_bytes": max_output_bytes}
        self.ch.send(header, code.encode("utf-8"))
        return rid

    def collect(self, rid, timeout=10.0, expect_also=()):
        """Output and exit of exec `rid`; `expect_also`: other frames that must show up meanwhile."""
        events = []
        pending = list(expect_also)
        deadline = time.monotonic() + timeout
        while True:
            header, payload = self.recv(max(0.01, deadline - time.monotonic()))
            if header in pending:
                pending.remove(header)
                continue
            self.assertEqual(header.get("id"), rid, header)
            if header["type"] == "exit":
                for _ in list(pending):
                    other, _ = self.recv()
                    self.assertIn(other, pending)
                    pending.remove(other)
                return Result(events, header)
            self.assertEqual(header["type"], "output", header)
            self.assertLessEqual(len(payload), 64 << 10)
            text = payload.decode("utf-8")  # strict: never a split character
            if events and events[-1][0] == header["stream"]:
                events[-1] = (header["stream"], events[-1][1] + text)
            else:
                events.append((header["stream"], text))

    def run_code(self, code, **kwargs):
        return self.collect(self.start(code, **kwargs))

    def assertError(self, header, code, rid="any"):
        self.assertEqual(header["type"], "error", header)
        self.assertEqual(header["code"], code, header)
        self.assertIsInstance(header["message"], str)
        if rid != "any":
            self.assertEqual(header["id"], rid, header)


class HandshakeTests(AgentCase):
    def test_hello(self):
        reply = self.request("hello", version=1)
        self.assertEqual(reply["type"], "hello")
        self.assertEqual(reply["version"], 1)
        self.assertTrue(reply["agent"].startswith("podflare-agent/"))
        self.assertEqual(reply["python"], "%d.%d.%d" % sys.version_info[:3])
        self.assertEqual(reply["pid"], self.agent.proc.pid)

    def test_started_event_comes_first(self):
        started = self.agent.started
        self.assertEqual((started["type"], started["id"], started["version"]), ("started", None, 1))
        self.assertEqual(started["pid"], self.agent.proc.pid)
        self.assertTrue(started["agent"].startswith("podflare-agent/"))

    def test_hello_unsupported_version(self):
        self.assertError(self.request("hello", version=2), "unsupported_version")
        self.assertError(self.request("hello", version=True), "unsupported_version")

    def test_ping(self):
        self.assertEqual(self.request("ping"), {"type": "pong", "id": 1})


class PythonTests(AgentCase):
    def test_state_persists_between_calls(self):
        first = self.run_code("x = 42; import json")
        self.assertEqual((first.code, first.events), (0, []))
        second = self.run_code("print(x, json.dumps({'ok': True}))")
        self.assertEqual(second.code, 0)
        self.assertEqual(second.stdout, '42 {"ok": true}\n')
        self.assertNotIn("error", second.exit)

    def test_exception_then_working_call(self):
        result = self.run_code("def f():\n    raise ValueError('boom')\n\nf()\n")
        self.assertEqual(result.code, 1)
        error = result.exit["error"]
        self.assertEqual((error["name"], error["value"]), ("ValueError", "boom"))
        self.assertIn("raise ValueError('boom')", error["traceback"])  # source lines via linecache
        self.assertIn('File "<cell-1>", line 4', error["traceback"])
        self.assertNotIn("podflare_agent", error["traceback"])
        self.assertEqual(result.stderr, error["traceback"])
        self.assertEqual(self.run_code("print('still here')").stdout, "still here\n")

    def test_huge_exception_fits_in_the_exit_header(self):
        code = "E = type('E' * 100000, (Exception,), {})\nraise E('\u00e9' * 100000)"
        result = self.run_code(code)
        self.assertEqual(result.code, 1)
        self.assertLess(len(result.exit["error"]["name"]), 300)
        self.assertLess(len(result.exit["error"]["value"]), 3000)
        self.assertIn("\u00e9" * 100000, result.stderr)  # the full text still goes to stderr

    def test_syntax_error(self):
        result = self.run_code("def broken(:\n")
        self.assertEqual(result.code, 1)
        self.assertEqual(result.exit["error"]["name"], "SyntaxError")
        self.assertIn("SyntaxError", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(self.run_code("1").stdout, "1\n")

    def test_system_exit(self):
        self.assertEqual(self.run_code("raise SystemExit(3)").exit, {"type": "exit", "id": 1, "code": 3})
        self.assertEqual(self.run_code("import sys; sys.exit()").code, 0)
        result = self.run_code("sys.exit('bye')")
        self.assertEqual((result.code, result.stderr), (1, "bye\n"))
        self.assertNotIn("error", result.exit)
        self.assertEqual(self.run_code("print('alive')").stdout, "alive\n")

    def test_last_expression_is_displayed(self):
        self.assertEqual(self.run_code("1 + 1").stdout, "2\n")
        self.assertEqual(self.run_code("_ * 10").stdout, "20\n")
        self.assertEqual(self.run_code("x = 5\nx").stdout, "5\n")
        self.assertEqual(self.run_code("'s'").stdout, "'s'\n")
        self.assertEqual(self.run_code("None").stdout, "")
        self.assertEqual(self.run_code("y = 7").stdout, "")
        self.assertEqual(self.run_code("_").stdout, "'s'\n")

    def test_stdout_stderr_order_is_exact(self):
        code = (
            "import sys\n"
            "for i in range(20):\n"
            "    if i % 2: print(f'err{i}', file=sys.stderr, flush=True)\n"
            "    else: print(f'out{i}', flush=True)\n"
        )
        result = self.run_code(code)
        expected = [("stderr" if i % 2 else "stdout", f"{'err' if i % 2 else 'out'}{i}\n") for i in range(20)]
        self.assertEqual(result.events, expected)

    def test_child_process_output_is_captured(self):
        result = self.run_code("import os\nprint('a')\nrc = os.system('echo b')")
        self.assertEqual((result.stdout, result.code), ("a\nb\n", 0))
        result = self.run_code("import subprocess\nsubprocess.run(['sh', '-c', 'echo to-err >&2'])\nNone")
        self.assertEqual(result.stderr, "to-err\n")
        result = self.run_code("subprocess.run(['echo', 'first']).returncode")
        self.assertEqual(result.stdout, "first\n0\n")  # a displayed value comes after child output

    def test_forked_child_output_is_captured(self):
        code = "import multiprocessing, sys\np = multiprocessing.Process(target=print, args=('from child',))\np.start(); p.join()"
        self.assertEqual(self.run_code(code).stdout, "from child\n")

    def test_c_stdio_output_is_flushed(self):
        result = self.run_code("import ctypes\nctypes.CDLL(None).printf(b'from C\\n')\nNone")
        self.assertEqual(result.stdout, "from C\n")

    def test_binary_buffer_writes(self):
        result = self.run_code("import sys\nsys.stdout.buffer.write('bytes \u00e9\\n'.encode())\nNone")
        self.assertEqual(result.stdout, "bytes \u00e9\n")

    def test_cwd_and_environment_persist(self):
        directory = os.path.realpath(tempfile.mkdtemp())
        self.addCleanup(os.rmdir, directory)
        self.run_code(f"import os\nos.chdir({directory!r})\nos.environ['PODFLARE_T'] = 'v1'")
        self.assertEqual(self.run_code("print(os.getcwd(), os.environ['PODFLARE_T'])").stdout, f"{directory} v1\n")
        self.assertEqual(self.run_code('pwd; echo "$PODFLARE_T"', language="bash").stdout, f"{directory}\nv1\n")

    def test_stdin_is_empty(self):
        self.assertEqual(self.run_code("import sys\nsys.stdin.read()").stdout, "''\n")
        self.assertEqual(self.run_code("input()").exit["error"]["name"], "EOFError")

    def test_main_module_is_the_repl(self):
        code = "import pickle, sys\nclass P: pass\nprint(sys.modules['__main__'].P is P, type(pickle.loads(pickle.dumps(P()))).__name__)"
        self.assertEqual(self.run_code(code).stdout, "True P\n")
        self.assertEqual(self.run_code("sys.argv, sys.path[0], __name__").stdout, "([''], '', '__main__')\n")

    def test_output_truncation(self):
        result = self.run_code("print('x' * 1000)\nprint('more')", max_output_bytes=100)
        self.assertEqual(result.stdout, "x" * 100)
        self.assertIs(result.exit["truncated"], True)
        # Cut at a character boundary: 5 bytes hold two 2-byte characters.
        result = self.run_code("print('\u00e9' * 10)", max_output_bytes=5)
        self.assertEqual(result.stdout, "\u00e9\u00e9")
        self.assertNotIn("truncated", self.run_code("print('fits')", max_output_bytes=5).exit)

    def test_large_output_is_split_on_characters(self):
        result = self.run_code("print('\u00e9' * 100000)")  # collect() checks frame size and UTF-8
        self.assertEqual(result.stdout, "\u00e9" * 100000 + "\n")


class TimeoutAndCancelTests(AgentCase):
    def test_busy_loop_times_out(self):
        began = time.monotonic()
        result = self.run_code("while True: pass", timeout_ms=300)
        self.assertLess(time.monotonic() - began, 3)
        self.assertEqual(result.code, 124)
        self.assertIs(result.exit["timed_out"], True)
        self.assertEqual(result.exit["error"]["name"], "KeyboardInterrupt")
        self.assertIn("KeyboardInterrupt", result.stderr)
        self.assertEqual(self.run_code("print('usable')").stdout, "usable\n")

    def test_sleep_times_out(self):
        began = time.monotonic()
        result = self.run_code("import time\ntime.sleep(100)", timeout_ms=200)
        self.assertLess(time.monotonic() - began, 3)
        self.assertEqual((result.code, result.exit.get("timed_out")), (124, True))
        self.assertIn("time.sleep(100)", result.stderr)
        self.assertNotIn("podflare_agent", result.stderr)  # not even the SIGINT handler

    def test_interrupt_is_repeated_when_swallowed(self):
        code = "import time\ntry:\n    time.sleep(100)\nexcept KeyboardInterrupt:\n    print('swallowed')\ntime.sleep(100)\n"
        began = time.monotonic()
        result = self.run_code(code, timeout_ms=200)
        self.assertLess(time.monotonic() - began, 4)
        self.assertEqual((result.code, result.stdout), (124, "swallowed\n"))

    def test_bash_timeout_kills_the_process_group(self):
        began = time.monotonic()
        result = self.run_code("sleep 100 & sleep 100; echo never", language="bash", timeout_ms=200)
        self.assertLess(time.monotonic() - began, 3)
        self.assertEqual((result.code, result.exit.get("timed_out"), result.stdout), (124, True, ""))

    def test_ping_is_answered_while_code_runs(self):
        rid = self.start("import time\nprint('go', flush=True)\ntime.sleep(0.5)\nprint('done')")
        header, payload = self.recv()
        self.assertEqual((header["type"], payload), ("output", b"go\n"))
        ping_id = self.new_id()
        self.ch.send({"type": "ping", "id": ping_id})
        self.assertEqual(self.recv(timeout=0.3)[0], {"type": "pong", "id": ping_id})
        self.assertEqual(self.collect(rid).stdout, "done\n")

    def test_cancel_queued_and_running(self):
        running = self.start("import time\nprint('started', flush=True)\ntime.sleep(100)")
        queued = self.start("print('never')")
        self.assertEqual(self.recv()[0]["type"], "output")  # `running` is on the main thread
        cancel_id = self.new_id()
        self.ch.send({"type": "cancel", "id": cancel_id, "target": queued})
        self.assertEqual(self.recv()[0], {"type": "exit", "id": queued, "code": 130, "cancelled": True})
        self.assertEqual(self.recv()[0], {"type": "ok", "id": cancel_id})
        cancel_id = self.new_id()
        self.ch.send({"type": "cancel", "id": cancel_id, "target": running})
        # The ok (reader thread) may come before or among the exec's last events.
        result = self.collect(running, expect_also=[{"type": "ok", "id": cancel_id}])
        self.assertEqual((result.code, result.exit["cancelled"]), (130, True))
        self.assertNotIn("timed_out", result.exit)
        self.assertIn("KeyboardInterrupt", result.stderr)
        self.assertEqual(self.request("cancel", target=999)["type"], "ok")  # unknown: idempotent
        self.assertEqual(self.run_code("print('after')").stdout, "after\n")

    def test_queue_is_bounded(self):
        self.start("import time\nprint('started', flush=True)\ntime.sleep(100)")
        self.assertEqual(self.recv()[0]["type"], "output")
        for _ in range(protocol.MAX_QUEUED_EXECS):
            self.start("pass")
        rid = self.start("pass")
        self.assertError(self.recv()[0], "busy", rid=rid)
        # _stop_agent: closing the channel drops the queue and interrupts the sleep.

    def test_close_while_code_runs(self):
        self.start("import time\ntime.sleep(100)")
        time.sleep(0.1)
        # _stop_agent checks that it exits cleanly.


    def test_cancel_during_writes_leaves_the_repl_whole(self):
        # The interrupt lands wherever the cell is: often inside the agent's own write path
        # (sys.stdout.write -> the collector). The REPL keeps its state, its lock and its
        # fd pump: the next calls' output (Python and a child process) arrives whole.
        self.assertEqual(self.run_code("kept = 7").code, 0)
        cell = "import sys\nfor _ in range(1 << 30):\n    sys.stdout.write('x' * 65536)"
        for delay in (0.0, 0.02, 0.05, 0.1, 0.2):
            rid = self.start(cell)
            time.sleep(delay)
            cancel_id = self.new_id()
            self.ch.send({"type": "cancel", "id": cancel_id, "target": rid})
            result = self.collect(rid, timeout=30, expect_also=[{"type": "ok", "id": cancel_id}])
            self.assertEqual((result.code, result.exit.get("cancelled")), (130, True), result.exit)
            self.assertEqual(result.exit["error"]["name"], "KeyboardInterrupt", result.exit)
            after = self.run_code("import os\nos.system('echo sub')\nprint(kept)")
            # A child's output is ordered best-effort against Python's own writes.
            self.assertEqual((after.code, sorted(after.stdout.splitlines())), (0, ["7", "sub"]), after.exit)


class BashTests(AgentCase):
    def test_bash(self):
        result = self.run_code("echo hi; echo err >&2; exit 5", language="bash")
        self.assertEqual((result.stdout, result.stderr, result.code), ("hi\n", "err\n", 5))

    def test_bash_killed_by_signal(self):
        self.assertEqual(self.run_code("kill -TERM $$", language="bash").code, 128 + 15)

    def test_bash_has_its_own_session(self):
        result = self.run_code("cut -d' ' -f6 /proc/$$/stat; echo $$", language="bash")
        sid, pid = result.stdout.split()
        self.assertEqual(sid, pid)


class MalformedFrameTests(AgentCase):
    def ping_works(self):
        self.assertEqual(self.request("ping")["type"], "pong")

    def test_garbage_then_valid_frame(self):
        self.ch.send_raw(b"garbage!" * 100 + b"PF" + encode({"type": "ping", "id": 7}))
        self.assertError(self.recv()[0], "bad_frame", rid=None)
        self.assertEqual(self.recv()[0], {"type": "pong", "id": 7})

    def test_lengths_out_of_bounds(self):
        for header_len, payload_len in ((70000, 0), (1, 0), (10, (1 << 20) + 1)):
            self.ch.send_raw(MAGIC + struct.pack(">II", header_len, payload_len) + b"x" * 30)
            self.assertError(self.recv()[0], "bad_frame", rid=None)
            self.ping_works()

    def test_truncated_frame_then_more_frames(self):
        # The next frame's bytes complete the truncated header (invalid JSON); what is left
        # of it is garbage up to the following magic.
        self.ch.send_raw(MAGIC + struct.pack(">II", 20, 0) + b'{"type"')
        self.assertTrue(self.ch.nothing_within(0.2))
        self.ch.send({"type": "ping", "id": 1})
        self.assertError(self.recv()[0], "bad_request", rid=None)
        self.assertError(self.recv()[0], "bad_frame", rid=None)
        self.ping_works()

    def test_truncated_frame_then_eof(self):
        self.ch.send_raw(MAGIC + struct.pack(">II", 100, 10) + b'{"type":')
        # _stop_agent closes the channel and checks the agent exits cleanly.

    def test_bad_headers(self):
        for raw in (b"{not json", b"[1, 2]", b'"str"', b"\xff\xfe\x00x", b"[" * 60000, b'{"id": 3}', b'{"type": 5, "id": 3}'):
            self.ch.send_raw(encode(raw))
            header = self.recv()[0]
            self.assertError(header, "bad_request")
            self.assertIn(header["id"], (None, 3))
        self.ping_works()

    def test_bad_ids(self):
        for rid in (0, -1, True, 1.5, "1", 1 << 53, None):
            self.ch.send({"type": "ping", "id": rid})
            self.assertError(self.recv()[0], "bad_request", rid=None)
        self.ch.send({"type": "ping"})
        self.assertError(self.recv()[0], "bad_request", rid=None)

    def test_unknown_type(self):
        self.assertError(self.request("nope"), "bad_request")
        self.assertError(self.request("stat_tree", path="/"), "bad_request")

    def test_bad_exec_requests(self):
        self.assertError(self.request("exec", b"1", language="ruby"), "bad_request")
        self.assertError(self.request("exec", b"1", language="python", timeout_ms=0), "bad_request")
        self.assertError(self.request("exec", b"1", language="python", max_output_bytes="9"), "bad_request")
        self.assertError(self.request("exec", b"\xff", language="python"), "bad_request")
        self.assertError(self.request("exec", b"echo \0", language="bash"), "bad_request")
        self.assertError(self.request("cancel"), "bad_request")
        self.ping_works()

    def test_stream_survives_everything_above(self):
        self.ch.send_raw(b"\x00" * 5000 + encode(b"{}") + MAGIC + b"\xff" * 8)
        self.assertError(self.recv()[0], "bad_frame")
        self.assertError(self.recv()[0], "bad_request")
        self.assertError(self.recv()[0], "bad_frame")
        self.assertEqual(self.run_code("print(6 * 7)").stdout, "42\n")


class FileTests(AgentCase):
    def setUp(self):
        super().setUp()
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        self.root = self.dir.name

    def upload(self, path, chunks, mode=None, size=None):
        reply = self.request("write_begin", path=path, mode=mode)
        self.assertEqual(reply["type"], "ok", reply)
        rid = reply["id"]
        for chunk in chunks:
            self.ch.send({"type": "write_chunk", "id": rid}, chunk)
        self.ch.send({"type": "write_end", "id": rid, "size": sum(map(len, chunks)) if size is None else size})
        return self.recv()[0]

    def test_write_creates_parents_and_sets_mode(self):
        path = os.path.join(self.root, "a", "b", "file.bin")
        data = os.urandom(3 << 20)
        reply = self.upload(path, [data[: 1 << 20], data[1 << 20 : 2 << 20], data[2 << 20 :]], mode=0o640)
        self.assertEqual(reply, {"type": "ok", "id": 1, "size": len(data)})
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["file.bin"])

    def test_overwrite_keeps_mode(self):
        path = os.path.join(self.root, "script.sh")
        with open(path, "w") as f:
            f.write("old")
        os.chmod(path, 0o755)
        self.assertEqual(self.upload(path, [b"new"])["type"], "ok")
        with open(path) as f:
            self.assertEqual(f.read(), "new")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o755)

    def test_size_mismatch_leaves_nothing(self):
        path = os.path.join(self.root, "f.txt")
        self.assertError(self.upload(path, [b"12345"], size=6), "bad_request", rid=1)
        self.assertEqual(os.listdir(self.root), [])

    def test_abort_leaves_nothing(self):
        path = os.path.join(self.root, "f.txt")
        rid = self.request("write_begin", path=path, mode=None)["id"]
        self.ch.send({"type": "write_chunk", "id": rid}, b"partial")
        self.ch.send({"type": "write_abort", "id": rid})
        self.assertEqual(self.recv()[0], {"type": "ok", "id": rid})
        self.assertEqual(os.listdir(self.root), [])
        self.ch.send({"type": "write_end", "id": rid, "size": 7})
        self.assertError(self.recv()[0], "unknown_transfer", rid=rid)

    def test_unfinished_upload_is_removed_when_the_channel_closes(self):
        rid = self.request("write_begin", path=os.path.join(self.root, "f"))["id"]
        self.ch.send({"type": "write_chunk", "id": rid}, b"partial")
        self.assertEqual(self.request("ping")["type"], "pong")  # the chunk was processed
        self.assertEqual(len(os.listdir(self.root)), 1)
        self.assertEqual(self.agent.close(), 0)
        self.assertEqual(os.listdir(self.root), [])

    def test_write_errors(self):
        self.assertError(self.request("write_begin", path="relative/file"), "bad_path")
        self.assertError(self.request("write_begin", path="/tmp/a\0b"), "bad_path")
        self.assertError(self.request("write_begin", path="/" + "a" * 5000), "bad_path")
        self.assertError(self.request("write_begin", path=self.root), "is_directory")
        self.assertError(self.request("write_begin", path=self.root + "/sub/"), "is_directory")
        with open(os.path.join(self.root, "plain"), "w"):
            pass
        self.assertError(self.request("write_begin", path=self.root + "/plain/x"), "bad_path")
        self.assertError(self.request("write_begin", path=self.root + "/m", mode=0o10000), "bad_request")
        self.ch.send({"type": "write_chunk", "id": 99}, b"x")
        self.assertError(self.recv()[0], "unknown_transfer", rid=99)
        self.assertEqual(os.listdir(self.root), ["plain"])

    def test_read_with_credit_window(self):
        path = os.path.join(self.root, "big.bin")
        data = os.urandom(300 << 10)
        with open(path, "wb") as f:
            f.write(data)
        window = 64 << 10
        rid = self.new_id()
        self.ch.send({"type": "read", "id": rid, "path": path, "window": window})
        self.assertEqual(self.recv()[0], {"type": "read_begin", "id": rid, "size": len(data)})
        received = bytearray()
        while True:
            # Exactly one window arrives, then nothing until it is acknowledged.
            target = min(len(received) + window, len(data))
            while len(received) < target:
                header, payload = self.recv()
                self.assertEqual(header, {"type": "data", "id": rid})
                received += payload
            self.assertEqual(len(received), target)
            if target == len(data):
                break
            self.assertTrue(self.ch.nothing_within(0.1))
            self.ch.send({"type": "read_ack", "id": rid, "bytes": len(received)})
        self.assertEqual(self.recv()[0], {"type": "read_end", "id": rid, "size": len(data)})
        self.assertEqual(bytes(received), data)

    def test_read_chunks_and_abort(self):
        path = os.path.join(self.root, "big.bin")
        with open(path, "wb") as f:
            f.write(b"z" * (2 << 20))
        rid = self.new_id()
        self.ch.send({"type": "read", "id": rid, "path": path, "window": 1 << 20})
        self.assertEqual(self.recv()[0]["type"], "read_begin")
        sizes = []
        while sum(sizes) < 1 << 20:
            header, payload = self.recv()
            self.assertEqual(header["type"], "data")
            sizes.append(len(payload))
        self.assertEqual(sizes, [256 << 10] * 4)
        self.ch.send({"type": "read_abort", "id": rid})
        self.ch.send({"type": "read_ack", "id": rid, "bytes": 1 << 20})  # late ack: ignored
        self.assertTrue(self.ch.nothing_within(0.2))
        self.assertEqual(self.request("ping")["type"], "pong")

    def test_read_errors(self):
        self.assertError(self.request("read", path=self.root + "/missing", window=65536), "not_found")
        self.assertError(self.request("read", path=self.root, window=65536), "is_directory")
        self.assertError(self.request("read", path="relative", window=65536), "bad_path")
        self.assertError(self.request("read", path="/dev/null", window=65536), "not_a_file")
        self.assertError(self.request("read", path=self.root, window=1024), "bad_request")

    def test_read_of_what_is_not_a_regular_file(self):
        fifo = os.path.join(self.root, "fifo")
        os.mkfifo(fifo)
        for path in (fifo, "/dev/null"):
            reply = self.request("read", path=path, window=65536)
            self.assertError(reply, "not_a_file")
            self.assertEqual(reply["message"], f"{path} is not a regular file")
        self.assertEqual(self.request("ping")["type"], "pong")

    def test_read_empty_file(self):
        path = os.path.join(self.root, "empty")
        open(path, "wb").close()
        self.assertEqual(self.request("read", path=path, window=65536), {"type": "read_begin", "id": 1, "size": 0})
        self.assertEqual(self.recv()[0], {"type": "read_end", "id": 1, "size": 0})


class DiskFullTests(AgentCase):
    LIMIT = 1 << 20

    @staticmethod
    def preexec_fn():
        # The agent's files may not grow past LIMIT: writes fail with EFBIG, like ENOSPC.
        resource.setrlimit(resource.RLIMIT_FSIZE, (DiskFullTests.LIMIT, DiskFullTests.LIMIT))

    def setUp(self):
        super().setUp()
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)

    def test_write_failure_is_reported_once_and_cleaned_up(self):
        rid = self.request("write_begin", path=os.path.join(self.dir.name, "big"))["id"]
        for _ in range(3):
            self.ch.send({"type": "write_chunk", "id": rid}, b"x" * (self.LIMIT // 2 + 1))
        self.assertError(self.recv()[0], "io_error", rid=rid)
        self.assertEqual(self.request("ping")["type"], "pong")  # the third chunk was dropped silently
        self.assertEqual(os.listdir(self.dir.name), [])
        self.ch.send({"type": "write_end", "id": rid, "size": 3 * (self.LIMIT // 2 + 1)})
        self.assertError(self.recv()[0], "io_error", rid=rid)
        self.assertEqual(self.request("write_abort")["type"], "ok")


class NoSpaceTests(unittest.TestCase):
    """A full disk, in-process: the upload's file is swapped for /dev/full, where every
    write fails with ENOSPC (a real one, from the kernel)."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        host, guest = socket.socketpair()
        self.addCleanup(host.close)
        self.addCleanup(guest.close)
        self.transfers = files.FileTransfers(protocol.FrameWriter(guest.fileno()))
        self.addCleanup(self.transfers.reset)

    def begin_on_a_full_disk(self, rid):
        self.assertEqual(self.transfers.write_begin(rid, {"path": os.path.join(self.dir.name, "f"), "mode": None}, b""), {"type": "ok", "id": rid})
        full = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(full, self.transfers._uploads[rid].fd, inheritable=False)
        os.close(full)

    def assertRefused(self, call, code, message):
        with self.assertRaises(protocol.RequestError) as caught:
            call()
        self.assertEqual((caught.exception.code, caught.exception.message), (code, message))

    def test_a_write_that_fails_with_enospc_says_no_space(self):
        self.begin_on_a_full_disk(1)
        self.assertRefused(lambda: self.transfers.write_chunk(1, {}, b"x" * 100), "no_space", "write failed: [Errno 28] No space left on device")
        self.assertEqual(os.listdir(self.dir.name), [])  # the temp file is gone
        self.assertIsNone(self.transfers.write_chunk(1, {}, b"x"))  # later chunks: dropped silently
        self.assertRefused(lambda: self.transfers.write_end(1, {"size": 101}, b""), "no_space", "the upload failed earlier: [Errno 28] No space left on device")

    def test_other_write_failures_stay_io_errors(self):
        self.assertEqual(files._os_error_code(OSError(errno.EIO, "Input/output error")), "io_error")
        self.assertEqual(files._os_error_code(OSError(errno.EFBIG, "File too large")), "io_error")
        self.assertEqual(files._os_error_code(OSError(errno.ENOSPC, "No space left on device")), "no_space")


class RestoreTests(AgentCase):
    def restore(self, **overrides):
        fields = {"entropy": base64.b64encode(os.urandom(64)).decode(), "time_ns": time.time_ns(), "hostname": "sbx-1", "machine_id": "0" * 32}
        fields.update(overrides)
        return self.request("restore", **fields)

    def test_restore_reseeds_random(self):
        self.run_code("import random\nrandom.seed(1234)")
        self.assertEqual(self.restore()["type"], "ok")
        expected = random.Random(1234).random()
        value = float(self.run_code("random.random()").stdout)
        self.assertNotEqual(value, expected)

    def test_restore_validation(self):
        self.assertError(self.restore(entropy=base64.b64encode(b"x" * 16).decode()), "bad_request")
        self.assertError(self.restore(entropy="not base64!"), "bad_request")
        self.assertError(self.restore(time_ns=-1), "bad_request")
        self.assertError(self.restore(hostname="Bad_Host"), "bad_request")
        self.assertError(self.restore(hostname="a" * 64), "bad_request")
        self.assertError(self.restore(machine_id="xyz"), "bad_request")


FORGE = """import os, json, struct
fd = next(int(f) for f in os.listdir('/proc/self/fd') if os.readlink(f'/proc/self/fd/{f}').startswith('socket:'))
def frame(header, payload=b''):
    head = json.dumps(header).encode()
    return b'PF\\x01\\x00' + struct.pack('>II', len(head), len(payload)) + head + payload
os.write(fd, b'garbage' + frame({'type': 'exit', 'id': 999, 'code': 0})
         + frame({'type': 'output', 'id': RID, 'stream': 'stdout'}, b'\\xff' + b'y' * 200)
         + frame({'type': 'output', 'id': RID, 'stream': 'evil'}, b'z')
         + frame({'type': 'alive', 'id': 'x'}) + b'PF\\x01\\x00' + struct.pack('>II', 1, 1 << 30))
"""


class WorkerTests(AgentCase):
    """The control process / REPL worker split."""

    extra_args = ("--kill-grace", "2.5")  # > the 1 s between interrupts (10 s in the guest)

    def test_user_code_runs_in_a_worker_of_the_agent(self):
        result = self.run_code("import os\nprint(os.getppid(), os.getpid())")
        parent, pid = map(int, result.stdout.split())
        self.assertEqual(parent, self.agent.proc.pid)
        self.assertNotEqual(pid, self.agent.proc.pid)

    def test_worker_death_ends_the_exec_once_and_a_fresh_repl_starts(self):
        self.run_code("x = 1")
        result = self.run_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
        self.assertEqual(result.code, 128 + 9)
        self.assertEqual(result.exit["error"]["name"], "ReplDied")
        self.assertIn("killed by SIGKILL", result.exit["error"]["value"])
        self.assertIn("state (variables, imports) is lost", result.exit["error"]["value"])
        self.assertTrue(result.stderr.startswith("podflare: the Python REPL process killed by SIGKILL"))
        self.assertTrue(self.ch.nothing_within(0.2))  # exactly one exit
        self.assertEqual(self.request("ping")["type"], "pong")
        self.assertEqual(self.run_code("print('x' in globals())").stdout, "False\n")

    def test_queued_execs_run_on_the_fresh_repl(self):
        first = self.start("import os\nos._exit(3)")
        second = self.start("print('second')")
        died = self.collect(first)
        self.assertEqual((died.code, died.exit["error"]["name"]), (3, "ReplDied"))
        self.assertEqual(self.collect(second).stdout, "second\n")

    def test_forked_child_leaves_quietly(self):
        # One write in the child: a child's output reaches the host through the fd pump,
        # the parent's directly, so two writes of one print() may interleave with it.
        code = "import os, sys\npid = os.fork()\nif pid == 0:\n    sys.stdout.write('child\\n')\nelse:\n    os.waitpid(pid, 0)\n    print('parent')"
        result = self.run_code(code)
        self.assertEqual((result.code, sorted(result.stdout.split())), (0, ["child", "parent"]))
        self.assertTrue(self.ch.nothing_within(0.3))  # no exit frame from the child
        self.assertEqual(self.run_code("print('next')").stdout, "next\n")

    def test_frames_forged_by_user_code_are_validated_and_capped(self):
        rid = self.new_id()
        code = FORGE.replace("RID", str(rid))
        self.ch.send({"type": "exec", "id": rid, "language": "python", "timeout_ms": None, "max_output_bytes": 50}, code.encode())
        result = self.collect(rid)  # asserts every frame is for rid and valid UTF-8
        self.assertEqual(result.code, 0, result.stderr)
        self.assertEqual(result.stdout, "\ufffd" + "y" * 47)  # 3 + 47 bytes
        self.assertIs(result.exit["truncated"], True)
        self.assertEqual(self.request("ping")["type"], "pong")

    def test_worker_that_ignores_the_interrupt_is_killed_after_the_grace(self):
        code = "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])\nwhile True: pass"
        began = time.monotonic()
        result = self.run_code(code, timeout_ms=200)
        self.assertLess(time.monotonic() - began, 8)
        self.assertEqual((result.code, result.exit.get("timed_out")), (124, True))
        self.assertEqual(result.exit["error"]["name"], "ReplKilled")
        self.assertEqual(self.run_code("print('fresh')").stdout, "fresh\n")

    def test_cancelled_exec_whose_output_the_host_takes_slowly_keeps_its_repl(self):
        # The code stops at once, but its last output (8 MiB queued before the cancel)
        # takes the slow host longer than the grace (2.5 s) to take: that is the agent's
        # flush moving, not a stuck REPL, so the REPL and its state stay.
        self.assertEqual(self.run_code("kept = 7").code, 0)
        rid = self.start("import sys, time\nsys.stdout.write('x' * (8 << 20))\ntime.sleep(100)")
        header, _ = self.recv()
        self.assertEqual(header["type"], "output")
        cancel_id = self.new_id()
        self.ch.send({"type": "cancel", "id": cancel_id, "target": rid})
        began = time.monotonic()
        while True:
            header, _ = self.recv(timeout=60)
            if header.get("id") == rid and header["type"] == "output":
                time.sleep(0.05)  # 64 KiB every 50 ms: 8 MiB take > 6 s
            elif header.get("id") == rid:
                break
        self.assertEqual((header["type"], header["code"], header.get("cancelled")), ("exit", 130, True), header)
        self.assertEqual(header["error"]["name"], "KeyboardInterrupt", header)
        self.assertGreater(time.monotonic() - began, 2 * 2.5, "the host was slower than the grace")
        self.assertEqual(self.run_code("print(kept)").stdout, "7\n")

    def test_code_that_swallows_interrupts_is_not_killed(self):
        code = "import time\nn = 0\nwhile n < 5:\n    try:\n        time.sleep(100)\n    except KeyboardInterrupt:\n        n += 1\nprint('done', n)"
        result = self.run_code(code, timeout_ms=100)  # 5 interrupts, 1 s apart: > the 2.5 s grace
        self.assertEqual((result.code, result.stdout), (124, "done 5\n"))
        self.assertNotIn("error", result.exit)


def _cgroup2_test_root():
    base = "/sys/fs/cgroup/unified" if os.path.exists("/sys/fs/cgroup/unified/cgroup.procs") else "/sys/fs/cgroup"
    if not os.path.exists(os.path.join(base, "cgroup.procs")) or os.geteuid() != 0:
        return None
    path = os.path.join(base, f"podflare-test-{os.getpid()}-{random.getrandbits(32):08x}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    if not os.path.exists(os.path.join(path, "cgroup.kill")):  # the root has none; 5.14+
        os.rmdir(path)
        return None
    return path


def _remove_cgroup_tree(path):
    for _ in range(200):
        try:
            with open(os.path.join(path, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            pass
        for parent, dirs, _ in sorted(os.walk(path), key=lambda entry: -entry[0].count("/")):
            for name in dirs:
                try:
                    os.rmdir(os.path.join(parent, name))
                except OSError:
                    pass
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.02)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pid, timeout=5.0):
    """True once `pid` has died: SIGKILL from cgroup.kill is delivered, not awaited."""
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not _alive(pid)


class CgroupTests(AgentCase):
    """The cgroup logic on the host's cgroup v2 (no controllers needed for procs and kill)."""

    def setUp(self):
        self.cg = _cgroup2_test_root()
        if self.cg is None:
            self.skipTest("needs root and a writable cgroup v2 hierarchy with cgroup.kill")
        self.addCleanup(_remove_cgroup_tree, self.cg)
        super().setUp()

    def agent_args(self):
        return ("--cgroup-root", self.cg)

    def procs(self, relative):
        with open(os.path.join(self.cg, relative, "cgroup.procs")) as f:
            return {int(pid) for pid in f.read().split()}

    def exec_cgroups(self):
        """The exec cgroups and their processes; one removed while being listed is skipped
        (the agent removes a finished call's cgroup in the background: opening it then
        fails with ENOENT, reading one removed after the open with ENODEV)."""
        found = {}
        for e in os.listdir(os.path.join(self.cg, "user")):
            if not e.startswith("exec-"):
                continue
            try:
                found[e] = self.procs(os.path.join("user", e))
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENODEV):
                    raise
        return found

    def wait_parked(self, worker, left=None):
        """The idle worker waits alone in the next call's cgroup (moved there after the
        exit frame, so the test waits for it); no other exec cgroup is left. `left`: the
        cgroup of the call that just ended, which the worker is alone in for a moment
        before the move."""
        deadline = time.monotonic() + 5
        while True:
            cgroups = self.exec_cgroups()
            if list(cgroups.values()) == [{worker}] and not self.procs("user/repl") and left not in cgroups:
                return next(iter(cgroups))
            self.assertLess(time.monotonic(), deadline, f"worker {worker} not parked: {cgroups}, repl {self.procs('user/repl')}")
            time.sleep(0.01)

    def test_layout(self):
        code = "import os\nprint(os.getpid())\nprint(open('/proc/self/cgroup').read().splitlines()[-1])"
        worker, line = self.run_code(code).stdout.splitlines()
        self.assertRegex(line, r"^0::/(.*/)?podflare-test-[^/]+/user/exec-\d+$")
        self.assertEqual(self.procs("agent"), {self.agent.proc.pid})
        parked = self.wait_parked(int(worker), left=line.rsplit("/", 1)[1])  # the call's cgroup is gone
        # The next call runs in the cgroup the worker waited in.
        self.assertEqual(self.run_code(code).stdout.splitlines(), [worker, line.rsplit("/", 1)[0] + "/" + parked])
        self.wait_parked(int(worker))

    def test_timeout_moves_the_worker_out_and_it_waits_in_a_fresh_cgroup(self):
        result = self.run_code("import os\nprint(os.getpid(), flush=True)\nimport time\ntime.sleep(100)", timeout_ms=300)
        self.assertEqual(result.code, 124)
        self.wait_parked(int(result.stdout))

    def test_timeout_kills_setsid_processes_and_finished_calls_children_live_on(self):
        keeper = int(self.run_code("import subprocess\nkeeper = subprocess.Popen(['sleep', '1000'], start_new_session=True)\nprint(keeper.pid)").stdout)
        code = "import subprocess, time\nsubprocess.run(['bash', '-c', 'setsid sleep 1000 & echo $!'])\ntime.sleep(100)"
        result = self.run_code(code, timeout_ms=300)
        self.assertEqual(result.code, 124)
        escapee = int(result.stdout)
        self.assertTrue(_gone(escapee))
        self.assertTrue(_alive(keeper))
        self.assertEqual(self.run_code("keeper.kill()\n_ = keeper.wait()").code, 0)

    def test_children_killed_at_a_timeout_are_reaped_and_free_their_pids(self):
        children = "import os\nprint(sum(len(open(f'/proc/self/task/{t}/children').read().split()) for t in os.listdir('/proc/self/task')))"
        code = "import subprocess, time\nps = [subprocess.Popen(['sleep', '1000']) for _ in range(5)]\nkept = subprocess.Popen(['true'])\nprint(*(p.pid for p in ps), flush=True)\ntime.sleep(100)"
        result = self.run_code(code, timeout_ms=1500)
        self.assertEqual(result.code, 124)
        self.assertTrue(all(_gone(int(pid)) for pid in result.stdout.split()))  # zombies count
        # The next exec reaped the five killed ones; `kept` exited by itself and is left
        # for user code to wait on.
        self.assertEqual(self.run_code(children).stdout, "1\n")
        self.assertEqual(self.run_code("print(kept.wait())").stdout, "0\n")
        self.assertEqual(self.run_code(children).stdout, "0\n")

    def test_bash_timeout_kills_double_forked_processes(self):
        result = self.run_code("(setsid sh -c 'sleep 1000 & echo $!' &) ; sleep 100", language="bash", timeout_ms=300)
        self.assertEqual(result.code, 124)
        pid = int(result.stdout)
        self.assertTrue(_gone(pid))

    def test_worker_death_kills_the_calls_processes_and_a_fresh_worker_starts(self):
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        pid_file = os.path.join(directory.name, "pid")
        code = f"import os, subprocess\np = subprocess.Popen(['sleep', '1000'], start_new_session=True)\nopen({pid_file!r}, 'w').write(str(p.pid))\nos.kill(os.getpid(), 9)"
        result = self.run_code(code)
        self.assertEqual(result.exit["error"]["name"], "ReplDied")
        with open(pid_file) as f:
            pid = int(f.read())
        self.assertTrue(_gone(pid))
        worker = int(self.run_code("import os\nprint(os.getpid())").stdout)
        self.wait_parked(worker)


class CgroupLimitTests(unittest.TestCase):
    def test_memory_limit_reserve(self):
        mib = 1 << 20
        # 10% reserve with a 96 MiB floor (a 1 GiB guest: MemTotal ~ 972 MiB -> 850 MiB).
        self.assertEqual(cgroups.memory_limit_for(995500 * 1024) >> 20, 850)
        self.assertEqual(cgroups.memory_limit_for(256 * mib), 160 * mib)
        self.assertEqual(cgroups.memory_limit_for(4096 * mib), 3584 * mib)
        self.assertEqual(cgroups.memory_limit_for(128 * mib), 64 * mib)  # never below half

    def test_favordynmods_remount_keeps_the_mount_flags(self):
        mounts = "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"
        libc = mock.Mock()
        libc.mount.return_value = 0
        cg = cgroups.Cgroups("/sys/fs/cgroup")
        with mock.patch.object(cgroups.os.path, "ismount", return_value=True), mock.patch.object(
            cgroups, "_read_text", return_value=mounts
        ), mock.patch.object(cgroups.ctypes, "CDLL", return_value=libc):
            cg.favor_dynmods()
        (source, target, fstype, flags, data), _ = libc.mount.call_args
        self.assertEqual((source, target, fstype, data), (b"cgroup2", b"/sys/fs/cgroup", b"cgroup2", b"favordynmods,nsdelegate"))
        self.assertEqual(flags.value, 32 | 2 | 4 | 8 | (1 << 21))  # MS_REMOUNT, nosuid, nodev, noexec, relatime

    def test_favordynmods_leaves_other_mounts_alone(self):
        libc = mock.Mock()
        with mock.patch.object(cgroups.ctypes, "CDLL", return_value=libc):
            cgroups.Cgroups(tempfile.gettempdir()).favor_dynmods()  # not a cgroup2 mount point
            with mock.patch.object(cgroups.os.path, "ismount", return_value=True), mock.patch.object(
                cgroups, "_read_text", return_value="cgroup2 /sys/fs/cgroup cgroup2 rw,favordynmods 0 0\n"
            ):
                cgroups.Cgroups("/sys/fs/cgroup").favor_dynmods()  # already on
        libc.mount.assert_not_called()



class PortModeTests(unittest.TestCase):
    """The reader in virtio-port mode, in-process: EOF there means "host not connected"."""

    class StubRunner:
        def __init__(self):
            self.stopped = threading.Event()

        def shutdown(self):
            self.stopped.set()

    def wait_for_log(self, log, message, count):
        deadline = time.monotonic() + 5
        while sum(call.args == (message,) for call in log.call_args_list) < count:
            self.assertLess(time.monotonic(), deadline, f"no log {message!r}")
            time.sleep(0.01)

    def test_disconnect_drops_partial_frame_and_uploads_then_reconnects(self):
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        host, guest = socket.socketpair()
        self.addCleanup(host.close)
        self.addCleanup(guest.close)
        channel = Channel(host)
        writer = protocol.FrameWriter(guest.fileno())
        runner = self.StubRunner()
        port, host_end = os.pipe()  # stands in for the port: reads EOF while nobody writes
        agent = dispatch.Agent(port, True, True, writer, runner, files.FileTransfers(writer))
        with mock.patch.object(dispatch, "log") as log:
            thread = threading.Thread(target=agent.read_loop)
            thread.start()
            begin = {"type": "write_begin", "id": 1, "path": os.path.join(directory.name, "f"), "mode": None}
            os.write(host_end, encode(begin) + encode({"type": "ping", "id": 2})[:10])
            self.assertEqual(channel.recv()[0], {"type": "ok", "id": 1})
            self.assertEqual(len(os.listdir(directory.name)), 1)  # the upload's temp file
            os.close(host_end)  # the host goes away mid-frame
            self.wait_for_log(log, "host disconnected", 1)
            self.assertEqual(os.listdir(directory.name), [])
            new_port, host_end = os.pipe()  # the host reconnects
            os.dup2(new_port, port)
            os.close(new_port)
            os.write(host_end, encode({"type": "ping", "id": 3}))
            self.assertEqual(channel.recv()[0], {"type": "pong", "id": 3})  # no trace of the partial frame
            os.close(host_end)
            self.wait_for_log(log, "host disconnected", 2)
            os.close(port)  # EBADF is the one read error that ends the reader
            thread.join(5)
        self.assertFalse(thread.is_alive())
        self.assertTrue(runner.stopped.is_set())


class InterruptInAgentCodeTests(unittest.TestCase):
    """A SIGINT whose handler runs while the cell is inside the agent's own code (its
    write path), in-process: the signal's timing is the one thing simulated."""

    def setUp(self):
        self.fd = os.open(os.devnull, os.O_WRONLY)
        self.addCleanup(os.close, self.fd)
        writer = protocol.FrameWriter(self.fd)
        self.collector = output.OutputCollector(writer)  # no flusher: pending stays
        self.runner = worker.ExecRunner(writer, self.collector, None)
        self.stream = output.CapturedStream(self.collector, "stdout", self.fd)
        self.stream._interrupt_point = self.runner.interrupt_point
        self.runner._current = job = worker.ExecJob(1, "python", "", None, 1 << 20)
        job.reason = "cancel"
        self.runner._armed = True
        self.collector.begin(1, 1 << 20)

    def signal_inside(self, method):
        """The collector's condition, with a SIGINT handled once inside `method` (as the
        real handler runs: on the main thread, in the frame executing there)."""
        runner = self.runner

        class Cond(threading.Condition):
            fired = False

            def fire(self):
                if not self.fired:
                    self.fired = True
                    runner._on_sigint(signal.SIGINT, sys._getframe(1))

            def __enter__(self):
                entered = super().__enter__()  # the lock is taken: the window of the leak
                if method == "__enter__":
                    self.fire()
                return entered

            def wait(self, timeout=None):
                if method == "wait":
                    self.fire()
                return super().wait(timeout)

        self.collector._cond = Cond()
        return self.collector._cond

    def lock_is_free(self, cond):
        got = []

        def take():
            got.append(cond.acquire(timeout=1.0))
            if got[0]:
                cond.release()

        thread = threading.Thread(target=take)
        thread.start()
        thread.join()
        return got[0]

    def test_interrupt_right_after_the_collector_lock_is_taken(self):
        cond = self.signal_inside("__enter__")
        with self.assertRaises(KeyboardInterrupt):
            self.stream.write("x" * 100)
        self.assertTrue(cond.fired)
        # Raised inside Condition.__enter__, the with block never ran and the lock stayed
        # taken for good: the flusher and the fd pump then blocked forever.
        self.assertTrue(self.lock_is_free(cond), "the collector's lock was left taken")
        self.assertEqual(self.runner._raises, 1)
        # The next exec's output is collected.
        self.collector.flush(final=True, exit_frame={"type": "exit", "id": 1, "code": 130})
        self.runner._current = worker.ExecJob(2, "python", "", None, 1 << 20)
        self.collector.begin(2, 1 << 20)
        self.assertEqual(self.stream.write("2\n"), 2)
        self.assertEqual(self.collector._chunks, [["stdout", bytearray(b"2\n")]])

    def test_interrupt_while_a_write_waits_for_room(self):
        cond = self.signal_inside("wait")
        self.collector._pending = output.PENDING_OUTPUT_CAP  # the host is not reading
        began = time.monotonic()
        with self.assertRaises(KeyboardInterrupt):
            self.stream.write("x")
        self.assertTrue(cond.fired)
        self.assertLess(time.monotonic() - began, 2.0, "the waiting write gave up at once")
        self.assertTrue(self.lock_is_free(cond))

    def test_interrupt_in_user_code_is_raised_at_once(self):
        with self.assertRaises(KeyboardInterrupt):
            self.runner._on_sigint(signal.SIGINT, sys._getframe())
        self.runner._current.reason = None  # a late signal for nothing: ignored
        self.runner._on_sigint(signal.SIGINT, sys._getframe())


class PureTests(unittest.TestCase):
    """The agent's pure helpers, in-process."""

    def frame(self, header, payload=b""):
        return encode(header, payload)

    def test_parser_byte_by_byte(self):
        parser = protocol.FrameParser()
        events = []
        for byte in self.frame({"type": "ping", "id": 1}, b"body"):
            events += parser.feed(bytes([byte]))
        self.assertEqual(events, [("frame", b'{"type": "ping", "id": 1}', b"body")])

    def test_parser_reset_drops_partial_frame(self):
        parser = protocol.FrameParser()
        self.assertEqual(parser.feed(self.frame({"type": "ping", "id": 1})[:15]), [])
        parser.reset()
        self.assertEqual(parser.room(), protocol.MAX_FRAME)
        frame = self.frame({"type": "ping", "id": 2})
        self.assertEqual(parser.feed(frame), [("frame", b'{"type": "ping", "id": 2}', b"")])

    def test_parser_keeps_partial_magic_after_garbage(self):
        parser = protocol.FrameParser()
        frame = self.frame({"type": "ping", "id": 1})
        events = parser.feed(b"junk" + frame[:3])
        self.assertEqual([kind for kind, _, _ in events], ["bad_frame"])
        self.assertEqual(parser.feed(frame[3:]), [("frame", b'{"type": "ping", "id": 1}', b"")])

    def test_parser_memory_is_bounded(self):
        parser = protocol.FrameParser()
        events = parser.feed(MAGIC + struct.pack(">II", 64 << 10, 1 << 20))
        while not events:
            self.assertGreater(parser.room(), 0)
            events = parser.feed(b"\x00" * min(parser.room(), 300_000))
        self.assertEqual([(kind, len(header), len(payload)) for kind, header, payload in events], [("frame", 64 << 10, 1 << 20)])
        self.assertEqual(parser.room(), protocol.MAX_FRAME)

    def test_rand_pool_info_layout(self):
        info = identity.rand_pool_info(b"\x01" * 32)
        self.assertEqual(struct.unpack_from("ii", info), (256, 32))
        self.assertEqual(info[8:], b"\x01" * 32)

    def test_utf8_cut(self):
        data = "a\u00e9\u20ac\U0001f600".encode()  # 1 + 2 + 3 + 4 bytes
        self.assertEqual([protocol._utf8_cut(data, 0, n) for n in range(11)], [0, 1, 1, 3, 3, 3, 6, 6, 6, 6, 10])

    def test_ioctl_numbers(self):
        def ioc(direction, kind, number, size):
            return direction << 30 | size << 16 | ord(kind) << 8 | number

        self.assertEqual(identity.RNDADDENTROPY, ioc(1, "R", 3, 8))
        self.assertEqual(identity.RNDRESEEDCRNG, ioc(0, "R", 7, 0))


if __name__ == "__main__":
    unittest.main()
