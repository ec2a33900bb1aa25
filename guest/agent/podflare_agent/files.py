"""File transfer in the control process (FileTransfers): atomic uploads and
credit-windowed downloads."""

import errno
import os
import stat
import threading

from .protocol import (
    ID_LIMIT,
    MAX_DOWNLOADS,
    MAX_MESSAGE,
    MAX_UPLOADS,
    MAX_WINDOW,
    MIN_WINDOW,
    READ_CHUNK,
    RequestError,
    _check_path,
    _clip,
    _int_field,
    _safe_str,
    _write_all,
)


def _os_error_code(exc):
    """The protocol code of a failed file operation: a full disk has its own."""
    return "no_space" if exc.errno == errno.ENOSPC else "io_error"


class _Upload:
    __slots__ = ("fd", "tmp", "path", "mode", "size", "failure", "failure_code")

    def __init__(self, fd, tmp, path, mode):
        self.fd, self.tmp, self.path, self.mode = fd, tmp, path, mode
        self.size = 0
        self.failure = None
        self.failure_code = None

    def discard(self):
        """Closes and removes the temporary file; idempotent."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


class _Download:
    __slots__ = ("fd", "window", "sent", "acked", "aborted")

    def __init__(self, fd, window):
        self.fd, self.window = fd, window
        self.sent = self.acked = 0
        self.aborted = False


class FileTransfers:
    """Atomic uploads (temp file in the target dir, fsync, rename) and credit-windowed downloads."""

    def __init__(self, writer):
        self._writer = writer
        self._uploads = {}  # reader thread only
        self._cond = threading.Condition()  # guards _downloads and their counters
        self._downloads = {}

    def reset(self):
        """The host went away: unfinished transfers are abandoned."""
        for upload in self._uploads.values():
            upload.discard()
        self._uploads.clear()
        with self._cond:
            for download in self._downloads.values():
                download.aborted = True
            self._cond.notify_all()

    def write_begin(self, rid, header, payload):
        path = _check_path(header.get("path"))
        mode = _int_field(header, "mode", 0, 0o7777, nullable=True)
        if rid in self._uploads:
            raise RequestError("bad_request", f"upload {rid} is already open")
        if len(self._uploads) >= MAX_UPLOADS:
            raise RequestError("busy", "too many open uploads")
        directory, name = os.path.split(path)
        if name in ("", ".", "..") or os.path.isdir(path):
            raise RequestError("is_directory", f"{path} names a directory")
        try:
            os.makedirs(directory, exist_ok=True)
            if mode is None:
                try:
                    mode = stat.S_IMODE(os.stat(path).st_mode)
                except FileNotFoundError:
                    mode = 0o644
            tmp = os.path.join(directory, f".{name[:32]}.podflare-{os.urandom(8).hex()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except (FileExistsError, NotADirectoryError):
            raise RequestError("bad_path", f"a parent of {path} is not a directory") from None
        except OSError as exc:
            raise RequestError(_os_error_code(exc), _safe_str(exc)) from None
        self._uploads[rid] = _Upload(fd, tmp, path, mode)
        return {"type": "ok", "id": rid}

    def write_chunk(self, rid, header, payload):
        upload = self._uploads.get(rid)
        if upload is None:
            raise RequestError("unknown_transfer", f"no open upload {rid}")
        if upload.failure is not None:
            return None  # reported once; chunks already in flight are dropped silently
        try:
            _write_all(upload.fd, payload)
        except OSError as exc:
            upload.failure, upload.failure_code = _safe_str(exc), _os_error_code(exc)
            upload.discard()
            raise RequestError(upload.failure_code, f"write failed: {exc}") from None
        upload.size += len(payload)
        return None

    def write_end(self, rid, header, payload):
        size = _int_field(header, "size", 0, ID_LIMIT - 1)
        upload = self._uploads.pop(rid, None)
        if upload is None:
            raise RequestError("unknown_transfer", f"no open upload {rid}")
        try:
            if upload.failure is not None:
                raise RequestError(upload.failure_code, f"the upload failed earlier: {upload.failure}")
            if upload.size != size:
                raise RequestError("bad_request", f"size mismatch: received {upload.size} bytes, expected {size}")
            try:
                os.fchmod(upload.fd, upload.mode)
                os.fsync(upload.fd)
                os.replace(upload.tmp, upload.path)
                upload.tmp = None  # it is the target now: discard() must leave it
                dir_fd = os.open(os.path.dirname(upload.path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)  # makes the rename itself durable
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                raise RequestError(_os_error_code(exc), _safe_str(exc)) from None
        finally:
            upload.discard()
        return {"type": "ok", "id": rid, "size": size}

    def write_abort(self, rid, header, payload):
        upload = self._uploads.pop(rid, None)
        if upload is not None:
            upload.discard()
        return {"type": "ok", "id": rid}  # idempotent, like cancel

    def read(self, rid, header, payload):
        path = _check_path(header.get("path"))
        window = _int_field(header, "window", MIN_WINDOW, MAX_WINDOW)
        with self._cond:
            if rid in self._downloads:
                raise RequestError("bad_request", f"download {rid} is already open")
            if len(self._downloads) >= MAX_DOWNLOADS:
                raise RequestError("busy", "too many open downloads")
        try:
            # O_NONBLOCK: opening a FIFO must not hang; such files are refused below.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise RequestError("not_found", f"{path} does not exist") from None
        except OSError as exc:
            raise RequestError(_os_error_code(exc), _safe_str(exc)) from None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise RequestError("is_directory", f"{path} is a directory")
            if not stat.S_ISREG(info.st_mode):
                raise RequestError("not_a_file", f"{path} is not a regular file")
            os.set_blocking(fd, True)
        except OSError as exc:
            os.close(fd)
            raise RequestError(_os_error_code(exc), _safe_str(exc)) from None
        except RequestError:
            os.close(fd)
            raise
        download = _Download(fd, window)
        with self._cond:
            self._downloads[rid] = download
        try:
            threading.Thread(target=self._stream, args=(rid, download, info.st_size), name=f"podflare-read-{rid}", daemon=True).start()
        except RuntimeError:  # out of threads
            with self._cond:
                del self._downloads[rid]
            os.close(fd)
            raise RequestError("busy", "cannot start a download thread") from None
        return None

    def read_ack(self, rid, header, payload):
        consumed = _int_field(header, "bytes", 0, ID_LIMIT - 1)
        with self._cond:
            download = self._downloads.get(rid)  # unknown: the transfer just ended
            if download is not None and consumed > download.acked:
                download.acked = min(consumed, download.sent)
                self._cond.notify_all()
        return None

    def read_abort(self, rid, header, payload):
        with self._cond:
            download = self._downloads.get(rid)
            if download is not None:
                download.aborted = True
                self._cond.notify_all()
        return None

    def _stream(self, rid, download, size):
        try:
            self._writer.send({"type": "read_begin", "id": rid, "size": size})
            while True:
                with self._cond:
                    while not download.aborted and download.sent - download.acked >= download.window:
                        self._cond.wait()
                    if download.aborted:
                        return
                    credit = download.window - (download.sent - download.acked)
                data = os.read(download.fd, min(READ_CHUNK, credit))
                if not data:
                    break
                with self._cond:
                    # Counted before sending, so an ack for these bytes is never clamped.
                    download.sent += len(data)
                if not self._writer.send({"type": "data", "id": rid}, data):
                    return
            self._writer.send({"type": "read_end", "id": rid, "size": download.sent})
        except OSError as exc:
            self._writer.send({"type": "error", "id": rid, "code": _os_error_code(exc), "message": _clip(_safe_str(exc), MAX_MESSAGE)})
        finally:
            with self._cond:
                if self._downloads.get(rid) is download:
                    del self._downloads[rid]
            os.close(download.fd)
