"""A podflare sandbox: a microVM with a persistent Python REPL."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, Iterable, Iterator, List, Optional, Union

from ._diff import DEFAULT_DIFF_PATHS, compare_listings, listing_command
from ._http import Http
from ._wire import EXIT_FLAGS, EXIT_RESULT, ExecEvent, SandboxInfo, sandbox_path
from .errors import ConnectionError, PodflareError


@dataclass
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int
    error: Optional[Dict[str, str]] = None
    timed_out: bool = False
    truncated: bool = False
    cancelled: bool = False  # the daemon cancelled the exec (code 130)


UploadData = Union[bytes, bytearray, str, BinaryIO, Iterable[bytes]]


class Sandbox:
    """`with Sandbox() as s:` creates a sandbox on enter and destroys it on exit."""

    def __init__(
        self,
        host: Optional[str] = None,
        api_key: Optional[str] = None,
        template: Optional[str] = None,
        *,
        vcpu_count: Optional[int] = None,
        mem_size_mib: Optional[int] = None,
        timeout_ms: Optional[int] = None,
        metadata: Optional[Dict[str, str]] = None,
        _id: Optional[str] = None,
        _http: Optional[Http] = None,
    ):
        self._http = _http or Http(host, api_key)
        self._closed = False
        if _id is not None:
            self.id = _id
            return
        body: Dict[str, Any] = {}
        for key, value in (
            ("template", template),
            ("vcpu_count", vcpu_count),
            ("mem_size_mib", mem_size_mib),
            ("timeout_ms", timeout_ms),
            ("metadata", metadata),
        ):
            if value is not None:
                body[key] = value
        self.info: SandboxInfo = self._http.json("POST", "/v1/sandboxes", body)
        self.id: str = self.info["id"]

    @classmethod
    def connect(cls, sandbox_id: str, host: Optional[str] = None, api_key: Optional[str] = None) -> "Sandbox":
        """Attach to an existing sandbox by id."""
        return cls._attach(sandbox_id, Http(host, api_key))

    @classmethod
    def _attach(cls, sandbox_id: str, http: Http) -> "Sandbox":
        sbx = cls(_id=sandbox_id, _http=http)
        sbx.info = http.json("GET", sandbox_path(sandbox_id))
        return sbx

    @staticmethod
    def list(host: Optional[str] = None, api_key: Optional[str] = None) -> List[SandboxInfo]:
        """The caller's sandboxes."""
        return Http(host, api_key).json("GET", "/v1/sandboxes")["sandboxes"]

    @property
    def _path(self) -> str:
        return sandbox_path(self.id)

    def run_code_stream(self, code: str, language: str = "python", timeout_ms: Optional[int] = None) -> Iterator[ExecEvent]:
        """Yield events as the code produces them; the last one is always `exit`."""
        body: Dict[str, Any] = {"code": code, "language": language}
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        return self._http.ndjson(self._http.request("POST", f"{self._path}/exec", json_body=body), ExecEvent)

    def run_code(self, code: str, language: str = "python", timeout_ms: Optional[int] = None) -> ExecResult:
        out: List[str] = []
        err: List[str] = []
        for event in self.run_code_stream(code, language, timeout_ms):
            kind = event.get("type")
            if kind == "stdout":
                out.append(event["data"])
            elif kind == "stderr":
                err.append(event["data"])
            elif kind == "exit":
                result: Dict[str, Any] = {EXIT_RESULT["code"]: int(event["code"]), EXIT_RESULT["error"]: event.get("error")}
                for flag in EXIT_FLAGS:
                    result[EXIT_RESULT[flag]] = bool(event.get(flag))
                return ExecResult(stdout="".join(out), stderr="".join(err), **result)
        raise ConnectionError("the exec stream ended without an exit event (the connection was cut)")

    def fork(self, n: int = 1) -> List["Sandbox"]:
        children = self._http.json("POST", f"{self._path}/fork", {"n": n})["children"]
        return [Sandbox._attach(child, self._http) for child in children]

    def diff(self, other: "Sandbox", paths: Optional[Iterable[str]] = None) -> Dict[str, List[str]]:
        """Files that differ between this sandbox and `other` under `paths` (default /root
        and /tmp): "added" are only in `other`, "removed" only here, "modified" in both."""
        command = listing_command(DEFAULT_DIFF_PATHS if paths is None else paths)
        return compare_listings(self._listing(command), other._listing(command))

    def _listing(self, command: str) -> Dict[str, str]:
        r = self.run_code(command, language="bash")
        if r.exit_code != 0:
            raise PodflareError(f"listing the files of {self.id} failed (exit {r.exit_code}): {r.stderr[:500]}")
        return json.loads(r.stdout)

    def merge_into(self, winner: Union["Sandbox", str]) -> None:
        """Afterwards this sandbox's id runs the winner's VM; the winner's id is gone."""
        winner_id = winner if isinstance(winner, str) else winner.id
        self._http.read(self._http.request("POST", sandbox_path(self.id, "merge_into", winner_id)))

    def upload(self, path: str, data: UploadData) -> None:
        """Write a file in the sandbox, atomically; file objects and iterables are streamed."""
        body: Union[bytes, Iterable[bytes]]
        if isinstance(data, str):
            body = data.encode("utf-8")
        elif isinstance(data, (bytes, bytearray)):
            body = bytes(data)
        elif hasattr(data, "read"):
            stream = data
            body = iter(lambda: stream.read(256 * 1024), b"")  # type: ignore[union-attr]
        else:
            body = data
        self._http.read(self._http.request("PUT", f"{self._path}/files", body=body, query={"path": path}))

    def download(self, path: str) -> bytes:
        return self._http.read(self._http.request("GET", f"{self._path}/files", query={"path": path}))

    def download_stream(self, path: str) -> Iterator[bytes]:
        """The file in chunks, for files too large to hold in memory."""
        return self._http.chunks(self._http.request("GET", f"{self._path}/files", query={"path": path}))

    def get_info(self) -> SandboxInfo:
        """The sandbox as the daemon sees it now (`info` is as it was at create or connect)."""
        return self._http.json("GET", self._path)

    def close(self) -> None:
        """Destroy the sandbox. Idempotent."""
        if self._closed:
            return
        self._http.read(self._http.request("DELETE", self._path))
        self._closed = True

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r})"
