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
* **the migration stream** does *not* use these certificates: each migration gets its own
  pre-shared key (:class:`MigrationKey`, QEMU ``tls-creds-psk``), made by the destination and
  handed to the source in the prepare answer over the mutually authenticated API, so no QEMU
  ever holds the node's key (docs/ARCHITECTURE.md, "The migration stream's key").
  :func:`setup_qemu_tls` writes QEMU's creds dir readable by QEMU's gid only, creates the object
  over QMP (QEMU loads the files then) and removes the files again; :func:`drop_qemu_tls`
  deletes the object when the migration ends.  Creating the object at migration time (not on
  the command line) also means a guest that arrived as a destination (``endpoint=server``)
  can later leave as a source (``endpoint=client``).

How the listener learns the caller's name without patching hypercorn: its TLS context uses
:class:`_PeerRecordingSSLObject`, which stores the verified peer's name in a context variable
when the handshake succeeds.  The handshake runs in the connection's task, and trio copies a
task's context into the tasks it spawns, so the ASGI app of every request on that connection
sees it (``supervisor._daemon`` puts it into the scope as ``qsup.peer_node``).
"""

from __future__ import annotations

import contextvars
import os
import secrets
import shutil
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import FieldError

if TYPE_CHECKING:
    from qmp_glue import QMPClient  # imported lazily at run time: `qsup ls` does without it

    from ._config import Config  # (which imports this module)

#: the verified client certificate's node name on this connection (None: no certificate)
PEER_NODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("qsup_peer_node", default=None)

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


class TlsError(FieldError, RuntimeError):
    """A TLS file cannot be used; ``field`` is the config key."""

    def __init__(self, message: str, field: str):
        super().__init__(message, field)


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


def check_qemu_reaches_run_dir(cfg: Config) -> None:
    """At daemon start: QEMU, as an instance uid, must be able to reach ``<run_dir>/tls``.

    Only with ``tls_*`` (QEMU reads its migration's keys there), a root daemon and
    ``qemu_user = "per-instance"``; not with ``qemu_chroot`` (the jail binds the directory
    under directories of its own).  QEMU has no group of a host directory, so every directory
    on the way -- as written and as resolved -- must be searchable by others.  Otherwise every
    TLS migration to this node would fail on "Permission denied", after its source started.
    ``TlsError`` naming ``run_dir`` and the first directory in the way.
    """
    if cfg.tls is None or cfg.qemu_user != "per-instance" or cfg.qemu_chroot or os.geteuid() != 0:
        return
    path = Path(os.path.abspath(cfg.run_dir))
    real = Path(os.path.realpath(path))
    for d in dict.fromkeys([*reversed(path.parents), path, *reversed(real.parents), real]):
        try:
            st = os.stat(d)
        except OSError:
            continue
        if not st.st_mode & stat.S_IXOTH:
            raise TlsError(f"QEMU (an instance uid of qemu_uids {cfg.qemu_uids}) cannot reach "
                           f"{str(path)!r}: {str(d)!r} is mode {stat.S_IMODE(st.st_mode):04o}, owner "
                           f"{st.st_uid}:{st.st_gid}, not searchable by others, so a TLS migration's keys in "
                           f"<run_dir>/tls would be unreadable to QEMU; make it searchable (chmod o+x) "
                           "or choose another run_dir (the default /run/qsup is)", "run_dir")


def make_qemu_creds_root(root: Path) -> None:
    """The creds root, 0711 root: traversable, not listable."""
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(root, 0o711)


#: QEMU's ``tls-creds-psk`` directory: ``keys.psk`` (``identity:hexkey`` lines) and, for the
#: server end, the DH parameters (without them QEMU generates some, see FFDHE2048_PEM)
PSK_FILE = "keys.psk"


@dataclass(frozen=True)
class MigrationKey:
    """A pre-shared key for one migration's stream (QEMU ``tls-creds-psk``).

    The destination makes it when it prepares the incoming migration and hands it to the
    source in the prepare answer, over the mutually authenticated API.  Only that source
    knows it, so the destination's QEMU accepts only that source; and no QEMU ever holds a
    certificate key of the node (a guest that escapes into its QEMU would take the node's
    identity with it: the API listener trusts that key).
    """

    key: str  # 64 hex digits (256 bits)
    identity: str = "qsup"

    @classmethod
    def new(cls) -> MigrationKey:
        return cls(secrets.token_hex(32))


def write_qemu_psk(path: Path, key: MigrationKey, gid: int | None) -> Path:
    """``path`` as QEMU's PSK creds dir: 0750 root:``gid``, files 0640."""
    shutil.rmtree(path, ignore_errors=True)
    make_qemu_creds_root(path.parent)
    path.mkdir(mode=0o700)
    try:
        for name, data in ((PSK_FILE, f"{key.identity}:{key.key}\n"), ("dh-params.pem", FFDHE2048_PEM)):
            dst = path / name
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
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


async def setup_qemu_tls(qmp: QMPClient, key: MigrationKey, creds_dir: Path, *, endpoint: str,
                         gid: int | None) -> str:
    """Give a running QEMU this migration's ``tls-creds-psk`` object and make its stream use it.

    ``endpoint="server"`` (destination: only a client with the key gets in) or ``"client"``
    (source).  A client reads its key when the object is made, so its files go at once; a
    server (GnuTLS) reads ``keys.psk`` at the handshake, so its dir -- this migration's key
    only, readable by QEMU's gid -- stays until :func:`drop_qemu_tls` (the migration's end) or
    the instance's teardown (:func:`remove_qemu_creds`).  Returns the object id.
    """
    oid = qemu_object_id(endpoint)
    await drop_qemu_tls(qmp, endpoint)  # left from an earlier migration of this QEMU
    write_qemu_psk(creds_dir, key, gid)
    args: dict[str, str] = {"qom-type": "tls-creds-psk", "id": oid, "dir": str(creds_dir), "endpoint": endpoint}
    if endpoint == "client":
        args["username"] = key.identity
    ok = False
    try:
        await qmp.execute("object-add", args)
        ok = True
    finally:
        if endpoint == "client" or not ok:
            shutil.rmtree(creds_dir, ignore_errors=True)
    await qmp.execute("migrate-set-parameters", {"tls-creds": oid, "tls-hostname": ""})
    return oid


async def drop_qemu_tls(qmp: QMPClient, endpoint: str, creds_dir: Path | None = None) -> None:
    """The migration is over: QEMU forgets the key (parameters cleared, object deleted), and its
    creds dir goes.  Best effort: QEMU may be gone already."""
    import qmp_glue

    try:
        await qmp.execute("migrate-set-parameters", {"tls-creds": ""}, timeout=5)
        await qmp.execute("object-del", {"id": qemu_object_id(endpoint)}, timeout=5)
    except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, qmp_glue.QMPTimeout):
        pass
    finally:
        if creds_dir is not None:
            shutil.rmtree(creds_dir, ignore_errors=True)


def remove_qemu_creds(run_dir: Path, name: str) -> None:
    """An instance's teardown: whatever creds dir a migration of it left (QEMU is dead)."""
    for endpoint in ("server", "client"):
        shutil.rmtree(qemu_creds_dir(run_dir, name, endpoint), ignore_errors=True)
