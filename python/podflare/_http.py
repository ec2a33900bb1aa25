"""HTTP plumbing of the SDK (standard library only): host, key, JSON, NDJSON, raw bytes."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import urllib.parse
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Union

from .errors import ConnectionError, PodflareError, TimeoutError, error_from_response

DEFAULT_HOST = "http://127.0.0.1:7070"
_CHUNK = 256 * 1024


class Http:
    def __init__(self, host: Optional[str] = None, api_key: Optional[str] = None, timeout: float = 600.0):
        raw = host or os.environ.get("PODFLARE_HOST") or DEFAULT_HOST
        if "://" not in raw:
            raw = "http://" + raw
        url = urllib.parse.urlsplit(raw.rstrip("/"))
        if url.scheme not in ("http", "https"):
            raise ValueError(f"PODFLARE_HOST must be an http(s) URL, got {raw!r}")
        self.host = raw.rstrip("/")
        self._url = url
        self._api_key = api_key or os.environ.get("PODFLARE_API_KEY") or None
        self._timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
        return cls(self._url.hostname or "127.0.0.1", self._url.port, timeout=self._timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: Union[bytes, Iterable[bytes], None] = None,
        query: Optional[Dict[str, str]] = None,
    ) -> http.client.HTTPResponse:
        """Send a request; return the open response (status < 400) or raise the mapped error."""
        target = (self._url.path or "") + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        headers = {}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        payload: Union[bytes, Iterable[bytes], None] = None
        if json_body is not None:
            payload = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            payload = body
            headers["Content-Type"] = "application/octet-stream"
            if not isinstance(body, (bytes, bytearray)):
                headers["Transfer-Encoding"] = "chunked"
        conn = self._connection()
        try:
            conn.request(method, target, body=payload, headers=headers, encode_chunked="Transfer-Encoding" in headers)
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            raise (TimeoutError if isinstance(exc, socket.timeout) else ConnectionError)(
                f"cannot reach the podflare daemon at {self.host} ({exc}); is `podflare serve` running? "
                "Set PODFLARE_HOST if it listens elsewhere"
            ) from exc
        if resp.status >= 400:
            try:
                with self.reading():
                    data = resp.read()
            finally:
                conn.close()
            raise error_from_response(resp.status, data)
        resp._podflare_connection = conn  # closed with the response: one connection a request
        return resp

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Around reading a response body: a cut or a timeout is a ConnectionError / TimeoutError."""
        try:
            yield
        except PodflareError:
            raise
        except socket.timeout as exc:
            raise TimeoutError(f"the podflare daemon at {self.host} sent nothing for too long while it answered ({exc})") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectionError(f"the connection to the podflare daemon at {self.host} was cut while it answered ({exc!r})") from exc

    def json(self, method: str, path: str, json_body: Any = None) -> Any:
        data = self.read(self.request(method, path, json_body=json_body))
        return json.loads(data) if data else None

    @staticmethod
    def release(resp: http.client.HTTPResponse) -> None:
        """Closes a response and the connection it came on (its socket, else left open
        until garbage collection)."""
        resp.close()
        conn = getattr(resp, "_podflare_connection", None)
        if conn is not None:
            conn.close()

    def read(self, resp: http.client.HTTPResponse) -> bytes:
        """The whole body of a response, which is then closed."""
        try:
            with self.reading():
                return resp.read()
        finally:
            self.release(resp)

    def ndjson(self, resp: http.client.HTTPResponse, make: Callable[[Dict[str, Any]], Any] = dict) -> Iterator[Any]:
        try:
            lines = iter(resp)
            while True:
                with self.reading():
                    line = next(lines, None)
                if line is None:
                    return
                line = line.strip()
                if line:
                    yield make(json.loads(line))
        finally:
            self.release(resp)

    def chunks(self, resp: http.client.HTTPResponse) -> Iterator[bytes]:
        try:
            while True:
                with self.reading():
                    block = resp.read(_CHUNK)
                if not block:
                    return
                yield block
        finally:
            self.release(resp)
