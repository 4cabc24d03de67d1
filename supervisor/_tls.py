"""Mutual TLS between nodes: the API listener, node-to-node calls, and QEMU's migration stream.

One CA (``tls_ca``) and one certificate per node (``tls_cert``/``tls_key``, PEM) serve all three:

* **the TCP API listener** (``listen``) serves HTTPS only and asks for a client certificate
  (``CERT_OPTIONAL``: a caller may present one signed by ``tls_ca``, or instead send the
  bearer token; a certificate *not* signed by ``tls_ca`` fails the handshake).  The caller of
  a verified certificate is the node its CN (else its first DNS SAN) names: see
  :func:`cert_node_name` and :data:`PEER_NODE`.
* **node-to-node calls** (:class:`supervisor._migration.PeerClient`) present the node's own
  certificate and check that the peer's certificate names the *declared peer* -- the ``[peers]``
  key -- whatever host or address the peer's URL holds (TLS ``server_hostname`` = peer name).
* **the migration stream**: QEMU's ``tls-creds-x509`` objects, ``endpoint=server`` with
  ``verify-peer=on`` on the destination, ``endpoint=client`` on the source, and
  ``migrate-set-parameters {"tls-creds", "tls-hostname"}`` (the peer's name: the destination's
  certificate must carry it in its SAN).  QEMU wants a directory of fixed file names
  (:data:`QEMU_FILES`); :func:`setup_qemu_tls` writes one readable by QEMU's gid only, creates
  the object over QMP (QEMU loads the files then) and removes the files again, so the node's
  key does not lie around where an instance's uid can read it.  Creating the object at
  migration time (not on the command line) also means a guest that arrived as a destination
  (``endpoint=server``) can later leave as a source (``endpoint=client``).

How the listener learns the caller's name without patching hypercorn: its TLS context uses
:class:`_PeerRecordingSSLObject`, which stores the verified peer's name in a context variable
when the handshake succeeds.  The handshake runs in the connection's task, and trio copies a
task's context into the tasks it spawns, so the ASGI app of every request on that connection
sees it (``supervisor._daemon`` puts it into the scope as ``qsup.peer_node``).
"""

from __future__ import annotations

import contextvars
import os
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmp_glue import QMPClient  # imported lazily at run time: `qsup ls` does without it

#: the verified client certificate's node name on this connection (None: no certificate)
PEER_NODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("qsup_peer_node", default=None)

#: QEMU's tls-creds-x509 directory layout (QEMU 7.2, docs/system/tls.rst)
QEMU_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem",
              "dh-params.pem")

#: ``dh-params.pem``: RFC 7919's ffdhe2048 group (public, fixed; ``openssl genpkey -genparam
#: -algorithm DH -pkeyopt group:ffdhe2048``).  Without this file a QEMU 7.2 ``endpoint=server``
#: object *generates* 2048-bit DH parameters when it is created, which blocks QEMU's main loop
#: for a long and unpredictable time on every incoming migration; with the file it only reads it.
FFDHE2048_PEM = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


class TlsError(RuntimeError):
    """A TLS file cannot be used; ``field`` is the config key."""

    def __init__(self, message: str, field: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


# -- names in certificates ---------------------------------------------------------------------

def cert_names(peercert: dict | None) -> list[str]:
    """The names a decoded certificate (``SSLObject.getpeercert()``) carries: CN first, then DNS SANs."""
    if not peercert:
        return []
    names = [v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"]
    names += [v for k, v in peercert.get("subjectAltName", ()) if k == "DNS"]
    return list(dict.fromkeys(names))


def cert_node_name(peercert: dict | None) -> str | None:
    """The node a verified certificate authenticates: its CN, else its first DNS SAN."""
    names = cert_names(peercert)
    return names[0] if names else None


def file_cert_names(path: str | os.PathLike) -> list[str]:
    """The names in a PEM certificate file (CPython's own decoder; [] if it can't be read)."""
    try:
        return cert_names(ssl._ssl._test_decode_cert(os.fspath(path)))  # type: ignore[attr-defined]  # noqa: SLF001
    except (AttributeError, OSError, ssl.SSLError, ValueError):
        return []


# -- contexts ------------------------------------------------------------------------------------

class _PeerRecordingSSLObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        PEER_NODE.set(cert_node_name(self.getpeercert()))


def server_context(tls: TlsFiles) -> ssl.SSLContext:
    """The API listener's context: our cert, client certs optional but verified against ``tls_ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    _load(ctx, tls)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.sslobject_class = _PeerRecordingSSLObject
    return ctx


def client_context(ca: str | os.PathLike | None, cert: str | os.PathLike | None = None,
                   key: str | os.PathLike | None = None) -> ssl.SSLContext:
    """A client's context: verify the server against ``ca`` (hostname checked), present ``cert``."""
    ctx = ssl.create_default_context(cafile=os.fspath(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
    return ctx


def peer_context(tls: TlsFiles) -> ssl.SSLContext:
    """Node-to-node: our own cert as client cert; the server must be signed by ``tls_ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname on, CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, tls)
    return ctx


def _load(ctx: ssl.SSLContext, tls: TlsFiles) -> None:
    for field, fn in (("tls_ca", lambda: ctx.load_verify_locations(cafile=str(tls.ca))),
                      ("tls_cert", lambda: ctx.load_cert_chain(str(tls.cert), str(tls.key)))):
        try:
            fn()
        except FileNotFoundError as e:
            raise TlsError(f"cannot read {e.filename}: {e.strerror}", field) from None
        except PermissionError as e:
            raise TlsError(f"cannot read {e.filename}: {e.strerror}", field) from None
        except ssl.SSLError as e:
            what = "tls_cert/tls_key" if field == "tls_cert" else field
            raise TlsError(f"not usable: {e.reason or e}", what.split("/")[0]) from None


def check_node_files(tls: TlsFiles, node_name: str) -> None:
    """At daemon start: the files load, and our certificate names this node (peers verify that)."""
    server_context(tls)
    peer_context(tls)
    names = file_cert_names(tls.cert)
    if names and node_name not in names:
        raise TlsError(f"{tls.cert} names {names}, not node_name {node_name!r} "
                       "(peers check that a node's certificate names it)", "tls_cert")


# -- QEMU's tls-creds-x509 -----------------------------------------------------------------------

def qemu_gid(pid: int | None) -> int | None:
    """QEMU's effective gid (``/proc/PID/status``), so its creds dir can be group-readable to it."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Gid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        pass
    return None


def qemu_creds_root(run_dir: Path) -> Path:
    """``<run_dir>/tls``: where every instance's QEMU creds dir is made at migration time (a
    jailed QEMU gets it bound, supervisor/_jail.py)."""
    return run_dir / "tls"


def qemu_creds_dir(run_dir: Path, name: str, endpoint: str) -> Path:
    """Instance ``name``'s creds dir as a migration ``endpoint`` (``server``/``client``)."""
    return qemu_creds_root(run_dir) / f"{name}.{endpoint}"


def make_qemu_creds_root(root: Path) -> None:
    """The creds root, 0711 root: traversable, not listable."""
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(root, 0o711)


def write_qemu_creds(path: Path, tls: TlsFiles, gid: int | None) -> Path:
    """``path`` as QEMU's creds dir: 0750 root:``gid``, files 0640 (the node cert is both ends)."""
    shutil.rmtree(path, ignore_errors=True)
    make_qemu_creds_root(path.parent)
    path.mkdir(mode=0o700)
    try:
        srcs = {"ca-cert.pem": tls.ca, "server-cert.pem": tls.cert, "server-key.pem": tls.key,
                "client-cert.pem": tls.cert, "client-key.pem": tls.key}
        for name in QEMU_FILES:
            dst = path / name
            data = Path(srcs[name]).read_bytes() if name in srcs else FFDHE2048_PEM.encode()
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if gid is not None and os.geteuid() == 0:
                os.chown(dst, 0, gid)
            os.chmod(dst, 0o640)
        if gid is not None and os.geteuid() == 0:
            os.chown(path, 0, gid)
        os.chmod(path, 0o750)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def qemu_object_id(endpoint: str) -> str:
    return f"qsup-tls-{endpoint}"


async def setup_qemu_tls(qmp: QMPClient, tls: TlsFiles, creds_dir: Path, *, endpoint: str, gid: int | None,
                         hostname: str | None) -> str:
    """Give a running QEMU a ``tls-creds-x509`` object and make its migration use it.

    ``endpoint="server"`` (destination: the source must present a certificate signed by
    ``tls_ca``) or ``"client"`` (source: the destination's certificate must be signed by
    ``tls_ca`` and carry ``hostname`` -- the peer's name -- in its SAN); ``verify-peer=on`` both.
    The files exist only while QEMU loads them.  Returns the object id.
    """
    import qmp_glue

    oid = qemu_object_id(endpoint)
    try:  # left from an earlier migration of this QEMU (objects are loaded once, at creation)
        await qmp.execute("object-del", {"id": oid})
    except qmp_glue.QMPError:
        pass
    write_qemu_creds(creds_dir, tls, gid)
    try:
        await qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": oid, "dir": str(creds_dir),
                                         "endpoint": endpoint, "verify-peer": True})
    finally:
        shutil.rmtree(creds_dir, ignore_errors=True)
    params: dict[str, str] = {"tls-creds": oid}
    if hostname:
        params["tls-hostname"] = hostname
    await qmp.execute("migrate-set-parameters", params)
    return oid
