"""The Python SDK's calls, their keywords and their failures, against a local HTTP server
that answers as the daemon would (or goes quiet, or cuts its answer short)."""
import gc
import inspect
import json
import os
import sys
import threading
import unittest
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import podflare  # noqa: E402
from podflare import _wire  # noqa: E402
from podflare._diff import listing_command  # noqa: E402
from podflare._http import Http  # noqa: E402

ODD = "sbx a/b?c#d"
INFO = {
    "id": ODD,
    "state": "ready",
    "template": "default",
    "vcpu_count": 2,
    "mem_size_mib": 1024,
    "created_at": "2026-01-01T00:00:00.000Z",
    "expires_at": "2026-01-01T00:05:00.000Z",
    "metadata": {},
}


class FakeDaemon(BaseHTTPRequestHandler):
    seen = []  # type: list
    exec_body = b""  # what POST .../exec answers; None: headers, one line, then silence
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self, status, body=b"", content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        FakeDaemon.seen.append(f"{self.command} {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding") == "chunked":
            while True:
                size = int(self.rfile.readline().strip(), 16)
                self.rfile.read(size + 2)
                if size == 0:
                    break
        else:
            self.rfile.read(length)
        if self.path.startswith("/v1/sandboxes/nope"):
            return self._answer(404, json.dumps({"error": "no sandbox nope", "code": "not_found"}).encode())
        if self.path.endswith("/exec"):
            return self._exec()
        if self.path.endswith("/fork"):
            return self._answer(201, json.dumps({"children": [ODD]}).encode())
        if self.command == "GET" and "/files" in self.path:
            return self._answer(200, b"bytes", "application/octet-stream")
        if self.command == "GET":
            return self._answer(200, json.dumps(INFO).encode())
        self._answer(204)

    def _exec(self):
        body = FakeDaemon.exec_body
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        if body is None:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            line = b'{"type":"stdout","data":"a","seq":0,"ts":1}\n'
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
            threading.Event().wait(2)  # quiet, as a long computation is
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _handle


class SdkTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ThreadingHTTPServer(("127.0.0.1", 0), FakeDaemon)
        cls.server.daemon_threads = True
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()
        cls.host = f"http://127.0.0.1:{cls.server.server_address[1]}"

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def setUp(self):
        FakeDaemon.seen.clear()
        FakeDaemon.exec_body = b'{"type":"exit","code":0,"seq":0,"ts":1}\n'

    def test_every_path_url_encodes_the_id(self):
        s = podflare.Sandbox.connect(ODD, host=self.host)
        s.get_info()
        s.run_code("1")
        [child] = s.fork()
        s.upload("/root/f", b"x")
        s.upload("/root/g", iter([b"x"]))
        s.download("/root/f")
        b"".join(s.download_stream("/root/f"))
        s.merge_into(ODD)
        child.close()
        sid = urllib.parse.quote(ODD, safe="")
        self.assertEqual(
            FakeDaemon.seen,
            [
                f"GET /v1/sandboxes/{sid}",
                f"GET /v1/sandboxes/{sid}",
                f"POST /v1/sandboxes/{sid}/exec",
                f"POST /v1/sandboxes/{sid}/fork",
                f"GET /v1/sandboxes/{sid}",
                f"PUT /v1/sandboxes/{sid}/files?path=%2Froot%2Ff",
                f"PUT /v1/sandboxes/{sid}/files?path=%2Froot%2Fg",
                f"GET /v1/sandboxes/{sid}/files?path=%2Froot%2Ff",
                f"GET /v1/sandboxes/{sid}/files?path=%2Froot%2Ff",
                f"POST /v1/sandboxes/{sid}/merge_into/{sid}",
                f"DELETE /v1/sandboxes/{sid}",
            ],
        )

    def test_every_call_closes_its_connection(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            s = podflare.Sandbox.connect(ODD, host=self.host)
            s.get_info()
            s.run_code("1")
            [child] = s.fork()
            s.upload("/root/f", b"x")
            s.download("/root/f")
            b"".join(s.download_stream("/root/f"))
            s.merge_into(ODD)
            child.close()
            del s, child
            gc.collect()
        self.assertEqual([str(w.message) for w in caught if issubclass(w.category, ResourceWarning)], [])

    def test_get_info_answers_the_daemons_view(self):
        self.assertEqual(podflare.Sandbox.connect(ODD, host=self.host).get_info(), INFO)

    def test_exit_flags_cancelled_included(self):
        FakeDaemon.exec_body = b'{"type":"stderr","data":"e","seq":0,"ts":1}\n{"type":"exit","code":130,"cancelled":true,"seq":1,"ts":2}\n'
        r = podflare.Sandbox.connect(ODD, host=self.host).run_code("x")
        self.assertEqual(r, podflare.ExecResult(stdout="", stderr="e", exit_code=130, cancelled=True))

    def test_stream_events_are_dicts_with_attributes_as_the_hosted_services(self):
        FakeDaemon.exec_body = b'{"type":"stdout","data":"a","seq":0,"ts":1}\n{"type":"exit","code":0,"seq":1,"ts":2}\n'
        events = list(podflare.Sandbox.connect(ODD, host=self.host).run_code_stream("x"))
        self.assertEqual(events, [{"type": "stdout", "data": "a", "seq": 0, "ts": 1}, {"type": "exit", "code": 0, "seq": 1, "ts": 2}])
        self.assertEqual((events[0].type, events[0].data, events[1].code), ("stdout", "a", 0))
        self.assertEqual(events[1].get("timed_out"), None)
        with self.assertRaises(AttributeError):
            events[1].timed_out  # noqa: B018

    def test_a_stream_without_its_exit_event_is_a_connection_error(self):
        FakeDaemon.exec_body = b'{"type":"stdout","data":"a","seq":0,"ts":1}\n'
        with self.assertRaisesRegex(podflare.ConnectionError, "exit event"):
            podflare.Sandbox.connect(ODD, host=self.host).run_code("x")

    def test_a_quiet_exec_past_the_socket_timeout_is_a_timeout_error(self):
        FakeDaemon.exec_body = None
        s = podflare.Sandbox(_id=ODD, _http=Http(self.host, timeout=0.3))
        with self.assertRaises(podflare.TimeoutError) as caught:
            s.run_code("import time; time.sleep(10)")
        e = caught.exception
        self.assertIsInstance(e, podflare.ConnectionError)
        self.assertIsInstance(e, TimeoutError)  # the built-in one, raised here before
        self.assertEqual((e.status, e.code), (None, "error"))

    def test_an_error_answer_is_its_class_with_status_code_and_message(self):
        with self.assertRaises(podflare.NotFoundError) as caught:
            podflare.Sandbox.connect("nope", host=self.host)
        e = caught.exception
        self.assertEqual((e.status, e.code, e.message, str(e)), (404, "not_found", "no sandbox nope", "no sandbox nope"))

    def test_an_unreachable_daemon_is_a_connection_error(self):
        with self.assertRaisesRegex(podflare.ConnectionError, "cannot reach"):
            podflare.Sandbox.list(host="http://127.0.0.1:9")

    def test_bad_diff_paths_are_an_invalid_argument_and_a_value_error(self):
        with self.assertRaises(podflare.InvalidArgumentError):
            listing_command(["relative"])
        with self.assertRaises(ValueError):
            listing_command(["/a\0b"])


class SpecTests(unittest.TestCase):
    """The SDK's keywords and results against _wire.py (the TypeScript SDK's unit tests
    check _wire.py against spec/openapi.yaml)."""

    def keywords(self, fn, leave_out=()):
        return sorted(p for p in inspect.signature(fn).parameters if p not in ("self",) + tuple(leave_out))

    def test_sandbox_keywords_are_create_sandboxs_fields(self):
        self.assertEqual(
            self.keywords(podflare.Sandbox.__init__, ("host", "api_key", "_id", "_http")),
            sorted(_wire.CREATE_SANDBOX_FIELDS),
        )

    def test_run_code_arguments_are_execs_fields(self):
        for fn in (podflare.Sandbox.run_code, podflare.Sandbox.run_code_stream):
            self.assertEqual(self.keywords(fn), sorted(_wire.EXEC_FIELDS))

    def test_exec_result_holds_every_field_of_the_exit_event(self):
        fields = [f.name for f in podflare.ExecResult.__dataclass_fields__.values()]
        rest = sorted(set(_wire.EXEC_EXIT_EVENT_FIELDS) - {"type", "seq", "ts"})
        self.assertEqual(sorted(_wire.EXIT_RESULT), rest)
        self.assertEqual(fields, ["stdout", "stderr"] + list(_wire.EXIT_RESULT.values()))

    def test_sandbox_info_is_the_sandbox_schema(self):
        self.assertEqual(sorted(_wire.SandboxInfo.__annotations__), sorted(_wire.SANDBOX_INFO_FIELDS))

    def test_the_other_calls_keywords(self):
        self.assertEqual(self.keywords(podflare.Sandbox.connect), ["api_key", "host", "sandbox_id"])
        self.assertEqual(self.keywords(podflare.Sandbox.list), ["api_key", "host"])
        self.assertEqual(self.keywords(podflare.Sandbox.fork), sorted(_wire.FORK_FIELDS))
        self.assertEqual(self.keywords(podflare.Sandbox.diff), ["other", "paths"])


if __name__ == "__main__":
    unittest.main()
