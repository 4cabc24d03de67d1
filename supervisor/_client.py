"""A small synchronous client for the node API (what the CLI uses).

It speaks HTTP over the daemon's unix socket (``httpx.HTTPTransport(uds=...)``) or, for another
node, over TCP with a bearer token.  It turns the API's answers into two exceptions a caller can
act on without parsing HTTP: :class:`ApiError` (the daemon answered with an error document) and
:class:`Unreachable` (nobody answered).

Timeouts: connecting is quick or it fails; reading has no fixed limit for the calls that wait on
a guest (``start`` waits until it runs, ``stop`` until QEMU exits, which can take the
powerdown timeout), and none at all for a followed event stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx

DEFAULT_CONFIG = Path("/etc/qsup/qsup.toml")
DEFAULT_SOCKET = Path("/run/qsup/qsup.sock")


class Unreachable(ConnectionError):
    """No daemon answered on the socket / URL."""


class ApiError(RuntimeError):
    """The daemon answered with an error: ``status``, one-line ``message``, ``field``, ``code``."""

    def __init__(self, status: int, message: str, field: str | None = None, code: str | None = None):
        super().__init__(f"{field}: {message}" if field and not message.startswith(f"{field}:") else message)
        self.status = status
        self.message = message
        self.field = field
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


class Client:
    """``Client(socket=PATH)`` or ``Client(url="http://node:8420", token="...")``."""

    def __init__(self, socket: str | os.PathLike | None = None, *, url: str | None = None,
                 token: str | None = None, timeout: float = 10.0):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if url:
            transport, base = httpx.HTTPTransport(retries=0), url.rstrip("/")
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

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, FileNotFoundError,
                ConnectionRefusedError, PermissionError) as e:
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
                downtime_limit: int | None = None) -> dict:
        body: dict = {"to": to, "postcopy": postcopy}
        if max_bandwidth:
            body["max_bandwidth"] = max_bandwidth
        if downtime_limit:
            body["downtime_limit"] = downtime_limit
        return self._request("POST", f"/v1/instances/{_seg(name)}/migrate", json=body).json()

    def cancel_migration(self, name: str) -> dict:
        return self._request("POST", f"/v1/instances/{_seg(name)}/migrate/cancel").json()

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def events(self, since: int = 0, follow: bool = False) -> Iterator[dict]:
        """Events with seq > since; with ``follow``, keeps yielding until the daemon goes away."""
        params = {"since": str(since), "follow": "true" if follow else "false"}
        try:
            with self._http.stream("GET", "/v1/events", params=params) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _api_error(r)
                for line in r.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except (httpx.ConnectError, httpx.ConnectTimeout, FileNotFoundError, ConnectionRefusedError,
                PermissionError) as e:
            raise Unreachable(f"cannot reach the qsup daemon at {self.where}: {_reason(e)}") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            if not follow:
                raise Unreachable(f"the qsup daemon at {self.where} went away mid-stream: {_reason(e)}") from None
            return  # the daemon went away (stopped, restarted): the follow ends


def _seg(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def _reason(e: BaseException) -> str:
    s = str(e) or type(e).__name__
    return s.splitlines()[0]


def _api_error(r: httpx.Response) -> ApiError:
    try:
        doc = r.json()
        return ApiError(r.status_code, str(doc.get("error") or r.reason_phrase), doc.get("field"), doc.get("code"))
    except (ValueError, AttributeError):
        return ApiError(r.status_code, f"HTTP {r.status_code} {r.reason_phrase}")
