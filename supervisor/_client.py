"""A small synchronous client for the node API (what the CLI uses).

It speaks HTTP over the daemon's unix socket (``httpx.HTTPTransport(uds=...)``) or, for another
node, over HTTPS with a client certificate and/or a bearer token.  It turns the API's answers into
two exceptions a caller can act on without parsing HTTP: :class:`RequestFailed` (the daemon
answered with an error document), :class:`Unreachable` (nobody answered) and its subclass
:class:`StreamLost` (a followed event stream ended because the daemon went away; it carries the
last seq received, to resume from).
(The server has its own ``ApiError``; the client's name differs so a traceback or an import
never leaves a doubt about which side raised it.)

Timeouts: connecting is quick or it fails; reading has no fixed limit for the calls that wait on
a guest (``start`` waits until it runs, ``stop`` until QEMU exits, which can take the
powerdown timeout), and none at all for a followed event stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from ._errors import FieldError

DEFAULT_CONFIG = Path("/etc/qsup/qsup.toml")
DEFAULT_SOCKET = Path("/run/qsup/qsup.sock")


class Unreachable(ConnectionError):
    """No daemon answered on the socket / URL."""


class StreamLost(Unreachable):
    """A followed event stream ended: the daemon stopped or restarted.  ``last_seq``: resume after it."""

    def __init__(self, message: str, last_seq: int):
        super().__init__(message)
        self.last_seq = last_seq


class RequestFailed(FieldError, RuntimeError):
    """The daemon answered with an error: one-line ``message``, ``field``, ``status``, ``code``."""

    def __init__(self, message: str, field: str | None = None, *, status: int, code: str | None = None):
        self.field_in_text = not (field and message.startswith(f"{field}:"))  # the server's usually does
        super().__init__(message, field)
        self.status = status
        self.code = code


def default_socket() -> Path:
    """$QSUP_SOCKET is handled by the CLI; this is the fallback: the default config's, or /run."""
    if DEFAULT_CONFIG.exists():
        try:
            from ._config import load_config

            return load_config(DEFAULT_CONFIG).socket
        except Exception:  # noqa: BLE001 -- a broken default config must not break `qsup ls`
            pass
    return DEFAULT_SOCKET


class ClientTlsError(ValueError):
    """--url/--cacert/--cert/--key cannot be used (one line, names the option)."""


def _is_loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    from ._addr import is_loopback_host

    return is_loopback_host(urlsplit(url).hostname or "")


class Client:
    """``Client(socket=PATH)``, or ``Client(url="https://node:8420", cacert=, cert=, key=)`` and/or ``token=``.

    Over ``https://`` the daemon's certificate is verified against ``cacert`` (the URL's host
    must be in it); ``cert``/``key`` is the client certificate (signed by the daemon's
    ``tls_ca``), which stands for the token.  ``http://`` only to a loopback address: a
    token never crosses a network in clear.
    """

    def __init__(self, socket: str | os.PathLike | None = None, *, url: str | None = None,
                 token: str | None = None, timeout: float = 10.0, cacert: str | os.PathLike | None = None,
                 cert: str | os.PathLike | None = None, key: str | os.PathLike | None = None):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if url:
            if url.startswith("https://"):
                import ssl

                from ._tls import client_context

                try:
                    verify = client_context(cacert, cert, key)
                except (OSError, ssl.SSLError) as e:
                    which = "--cacert" if cacert and not cert else "--cert/--key"
                    raise ClientTlsError(f"{which}: {getattr(e, 'strerror', None) or e}") from None
                transport = httpx.HTTPTransport(retries=0, verify=verify)
            elif url.startswith("http://") and _is_loopback_url(url):
                if cacert or cert or key:
                    raise ClientTlsError("url: --cacert/--cert/--key need an https:// URL")
                transport = httpx.HTTPTransport(retries=0)
            else:
                raise ClientTlsError(f"url: {url[:80]!r}: https://HOST:PORT, or http:// to a loopback address")
            base = url.rstrip("/")
            self.where = base
        else:
            path = str(socket or default_socket())
            transport, base = httpx.HTTPTransport(uds=path), "http://qsup"
            self.where = path
        self._http = httpx.Client(transport=transport, base_url=base, headers=headers,
                                  timeout=httpx.Timeout(timeout, read=None))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                FileNotFoundError, ConnectionRefusedError, PermissionError) as e:
            raise Unreachable(f"cannot reach the qsup daemon at {self.where}: {_reason(e)}") from None
        if r.status_code >= 400:
            raise _api_error(r)
        return r

    # -- the API -----------------------------------------------------------------------------
    def health(self) -> dict:
        return self._request("GET", "/v1/health").json()

    def start(self, spec: dict) -> dict:
        return self._request("POST", "/v1/instances", json=spec).json()

    def list(self) -> list[dict]:
        return self._request("GET", "/v1/instances").json()["instances"]

    def show(self, name: str) -> dict:
        return self._request("GET", f"/v1/instances/{_seg(name)}").json()

    def stop(self, name: str, *, force: bool = False, timeout: float | None = None) -> dict:
        body: dict = {"force": force}
        if timeout is not None:
            body["timeout"] = float(timeout)
        return self._request("POST", f"/v1/instances/{_seg(name)}/stop", json=body).json()

    def delete(self, name: str) -> dict:
        return self._request("DELETE", f"/v1/instances/{_seg(name)}").json()

    def migrate(self, name: str, to: str, *, postcopy: bool = False, max_bandwidth: int | None = None,
                downtime_limit: int | None = None, switchover: str | None = None) -> dict:
        body: dict = {"to": to, "postcopy": postcopy}
        if switchover:
            body["switchover"] = switchover
        if max_bandwidth:
            body["max_bandwidth"] = max_bandwidth
        if downtime_limit:
            body["downtime_limit"] = downtime_limit
        return self._request("POST", f"/v1/instances/{_seg(name)}/migrate", json=body).json()

    def upgrade(self, name: str, qemu: str | None = None) -> dict:
        body = {"qemu": qemu} if qemu else {}
        return self._request("POST", f"/v1/instances/{_seg(name)}/upgrade", json=body).json()

    def add_disk(self, name: str, disk: dict) -> dict:
        """Hotplug ``disk`` (a DiskSpec as a dict): ``{"disk": as recorded, "view"}``."""
        return self._request("POST", f"/v1/instances/{_seg(name)}/disks", json=disk).json()

    def remove_disk(self, name: str, disk_id: str) -> dict:
        return self._request("DELETE", f"/v1/instances/{_seg(name)}/disks/{_seg(disk_id)}").json()

    def resize_disk(self, name: str, disk_id: str, size: int | str) -> dict:
        return self._request("POST", f"/v1/instances/{_seg(name)}/disks/{_seg(disk_id)}/resize",
                             json={"size": size}).json()

    def add_nic(self, name: str, nic: dict) -> dict:
        """Hotplug ``nic`` (a NicSpec as a dict): ``{"nic": as recorded, "view"}``."""
        return self._request("POST", f"/v1/instances/{_seg(name)}/nics", json=nic).json()

    def remove_nic(self, name: str, mac: str) -> dict:
        return self._request("DELETE", f"/v1/instances/{_seg(name)}/nics/{_seg(mac)}").json()

    def set_nic(self, name: str, mac: str, nic: dict) -> dict:
        """Change NIC ``mac``'s network live to ``nic`` (its whole new NicSpec)."""
        return self._request("PUT", f"/v1/instances/{_seg(name)}/nics/{_seg(mac)}", json=nic).json()

    def set_disk_limits(self, name: str, disk_id: str, limits: dict) -> dict:
        """``limits``: I/O limit fields; absent ones stay, None removes one."""
        return self._request("PATCH", f"/v1/instances/{_seg(name)}/disks/{_seg(disk_id)}", json=limits).json()

    def attach_console(self, name: str, *, force: bool = False, tail: int | None = None,
                       timeout: float = 10.0) -> ConsoleSession:
        """Attach to ``name``'s serial console, two-way (the unix socket only): a
        :class:`ConsoleSession`.  409 (:class:`RequestFailed`): another client is attached and
        not ``force``, or the instance does not run here."""
        if "://" in self.where:
            raise ClientTlsError("url: console --attach goes through the daemon's unix socket only")
        query = f"?force={'true' if force else 'false'}" + (f"&tail={int(tail)}" if tail is not None else "")
        return ConsoleSession.open(self.where, f"/v1/instances/{_seg(name)}/console/attach{query}", timeout)

    def cancel_migration(self, name: str) -> dict:
        return self._request("POST", f"/v1/instances/{_seg(name)}/migrate/cancel").json()

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def events(self, since: int = 0, follow: bool = False) -> Iterator[dict]:
        """Events with seq > since.

        Without ``follow`` the iteration ends after the last stored event.  With ``follow`` it
        never ends normally: the daemon ends a followed stream only when it stops, so the end of
        the stream, clean or not, raises :class:`StreamLost` with the last seq received.
        """
        params = {"since": str(since), "follow": "true" if follow else "false"}
        last = since
        try:
            with self._http.stream("GET", "/v1/events", params=params) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _api_error(r)
                for line in r.iter_lines():
                    if line.strip():
                        ev = json.loads(line)
                        last = ev.get("seq", last)
                        yield ev
        except (httpx.ConnectError, httpx.ConnectTimeout, FileNotFoundError, ConnectionRefusedError,
                PermissionError) as e:
            raise Unreachable(f"cannot reach the qsup daemon at {self.where}: {_reason(e)}") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            if not follow:
                raise Unreachable(f"the qsup daemon at {self.where} went away mid-stream: {_reason(e)}") from None
            raise StreamLost(f"the qsup daemon at {self.where} went away ({_reason(e)})", last) from None
        if follow:
            raise StreamLost(f"the qsup daemon at {self.where} ended the stream", last)

    def follow_events(self, since: int = 0, *, reconnect: bool = True,
                      on_lost: Callable[[StreamLost], None] | None = None,
                      on_resumed: Callable[[int], None] | None = None,
                      backoff_max: float = 2.0) -> Iterator[dict]:
        """Follow the stream, surviving daemon restarts: reconnect and resume after the last seq.

        The first connection must succeed (else :class:`Unreachable`).  When the stream is lost
        it retries forever, from 0.1 s up to ``backoff_max`` between attempts (``tail -F``
        semantics: Ctrl-C ends it); ``on_lost`` is called once per loss and ``on_resumed`` once
        the stream is back.  With ``reconnect=False`` the :class:`StreamLost` propagates.
        Because seq is persisted and strictly increasing, resuming after ``last_seq`` neither
        skips nor repeats an event.
        """
        import time

        last = since
        ever_connected = False
        while True:
            try:
                for ev in self.events(since=last, follow=True):
                    last = ev.get("seq", last)
                    yield ev
            except StreamLost as e:
                ever_connected = True
                if not reconnect:
                    raise StreamLost(str(e), last) from None
                if on_lost is not None:
                    on_lost(StreamLost(str(e), last))
            except Unreachable:
                if not ever_connected:
                    raise
                # the daemon answered the health check, then went away again: keep waiting
            delay = 0.1
            while True:
                time.sleep(delay)
                try:
                    self.health()
                    break
                except Unreachable:
                    delay = min(delay * 2, backoff_max)
                except RequestFailed:
                    break  # it answers: the events request will say what is wrong
            if on_resumed is not None:
                on_resumed(last)


def _seg(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def _reason(e: BaseException) -> str:
    s = str(e) or type(e).__name__
    return s.splitlines()[0]


def _api_error(r: httpx.Response) -> RequestFailed:
    try:
        doc = r.json()
        return RequestFailed(str(doc.get("error") or r.reason_phrase), doc.get("field"), status=r.status_code,
                             code=doc.get("code"))
    except (ValueError, AttributeError):
        return RequestFailed(f"HTTP {r.status_code} {r.reason_phrase}", status=r.status_code)


class ConsoleSession:
    """One attached serial console (``POST /v1/instances/{name}/console/attach``, described in
    supervisor/api/_console_routes.py): one HTTP/1.1 exchange whose request body (chunked) is
    what :meth:`send` types and whose response body is frames :meth:`receive` decodes.

    :meth:`send` and :meth:`receive` may run on two threads (the socket stays blocking; a
    receive waits with ``select``).  :meth:`detach` ends the request body: the daemon answers
    with the end frame and closes.
    """

    def __init__(self, sock: Any, where: str):
        self._sock = sock
        self.where = where
        self._raw = bytearray()  # from the socket, not yet de-chunked
        self._body = bytearray()  # de-chunked response body, not yet a whole frame
        self._left = 0  # bytes left in the current chunk
        self._crlf = False  # a chunk's CRLF is due
        self._done = False  # the last chunk arrived
        self._eof = False
        self._detached = False
        #: the end frame's object once received: {"reason", "dropped", "unsent"}
        self.end: dict | None = None

    @classmethod
    def open(cls, socket_path: str, target: str, timeout: float) -> ConsoleSession:
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        session = cls(sock, socket_path)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(socket_path)
                sock.sendall(f"POST {target} HTTP/1.1\r\nHost: qsup\r\nTransfer-Encoding: chunked\r\n"
                             "Content-Type: application/octet-stream\r\n\r\n".encode())
                status, headers = session._read_head()
            except (OSError, ValueError) as e:
                raise Unreachable(f"cannot reach the qsup daemon at {socket_path}: {_reason(e)}") from None
            sock.settimeout(None)
            if status != 200:
                raise session._error(status, headers)
            if headers.get("transfer-encoding", "").lower() != "chunked":
                raise Unreachable(f"the qsup daemon at {socket_path} answered the attach without a chunked body")
        except BaseException:
            sock.close()
            raise
        session._dechunk()
        return session

    def _read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self._raw:
            data = self._sock.recv(65536)
            if not data:
                raise ValueError("the connection closed before the answer")
            self._raw += data
            if len(self._raw) > 65536:
                raise ValueError("an answer header over 64 KiB")
        head, _, rest = bytes(self._raw).partition(b"\r\n\r\n")
        self._raw = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return int(parts[1]), headers

    def _error(self, status: int, headers: dict[str, str]) -> RequestFailed:
        length = int(headers.get("content-length") or 0)
        while len(self._raw) < length:
            data = self._sock.recv(65536)
            if not data:
                break
            self._raw += data
        try:
            doc = json.loads(bytes(self._raw[:length]))
            return RequestFailed(str(doc.get("error") or f"HTTP {status}"), doc.get("field"), status=status,
                                 code=doc.get("code"))
        except (ValueError, AttributeError):
            return RequestFailed(f"HTTP {status}", status=status)

    def _dechunk(self) -> None:
        raw = self._raw
        while not self._done:
            if self._left:
                take = min(self._left, len(raw))
                self._body += raw[:take]
                del raw[:take]
                self._left -= take
                if self._left:
                    return
                self._crlf = True
            if self._crlf:
                if len(raw) < 2:
                    return
                del raw[:2]
                self._crlf = False
            i = raw.find(b"\r\n")
            if i < 0:
                return
            size = int(bytes(raw[:i]).split(b";")[0].strip() or b"0", 16)
            del raw[:i + 2]
            if size == 0:
                self._done = True
            self._left = size

    def _frame(self) -> tuple[str, Any] | None:
        if len(self._body) < 5:
            return None
        kind, n = self._body[0:1], int.from_bytes(self._body[1:5], "big")
        if len(self._body) < 5 + n:
            return None
        payload = bytes(self._body[5:5 + n])
        del self._body[:5 + n]
        if kind == b"o":
            return "output", payload
        doc = json.loads(payload)
        if kind == b"e":
            self.end = doc
            return "end", doc
        return "notice", doc

    def receive(self, timeout: float | None = None) -> tuple[str, Any] | None:
        """The next frame: ``("output", bytes)``, ``("notice", {"dropped": N})`` or ``("end",
        {"reason", ...})`` (nothing follows it); None when ``timeout`` passed first.  The daemon
        gone without an end frame: :class:`StreamLost`."""
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            f = self._frame()
            if f is not None:
                return f
            if self.end is not None or self._eof or self._done:
                if self.end is None:
                    raise StreamLost(f"the console stream from {self.where} ended without its end", 0)
                return None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                return None
            try:
                data = self._sock.recv(65536)
            except OSError as e:
                raise StreamLost(f"the console stream from {self.where} broke: {_reason(e)}", 0) from None
            if not data:
                self._eof = True
            self._raw += data
            self._dechunk()

    def send(self, data: bytes) -> None:
        """Type ``data`` (ignored once detached or ended)."""
        if data and not self._detached:
            try:
                self._sock.sendall(b"%x\r\n" % len(data) + data + b"\r\n")
            except OSError:
                pass  # the daemon closed: receive() tells how it ended

    def detach(self) -> None:
        """End what is typed: the daemon detaches this client and ends the stream."""
        if not self._detached:
            self._detached = True
            try:
                self._sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ConsoleSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
        self.close()
