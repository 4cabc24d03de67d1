"""Node configuration (``qsup serve --config PATH``, also ``qsup run --config``).

TOML, validated like the instance spec: unknown keys are refused and errors
name the key.  Every key has a default so ``qsup run`` works without a file.
"""

from __future__ import annotations

import ipaddress
import re
import socket as _socket
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from ._addr import is_loopback_host
from ._images import locate
from ._limits import DEFAULT_IMAGE_DIRS, ImageDirs
from ._spec import ACCEL_RE, NAME_PATTERN, OnPanic, SpecError, _loc, _message
from ._tls import TlsFiles
from ._uids import DEFAULT_QEMU_UIDS, QemuUids

#: a node name as a ``[peers]`` key (also what its certificate must name)
NODE_NAME_RE = re.compile(NAME_PATTERN + r"\Z")
_HOSTNAME_RE = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


def _host(value: str) -> str:
    """An IP literal or a DNS host name, checked whole; ValueError otherwise."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not isinstance(value, str) or not _HOSTNAME_RE.match(value) or value.replace(".", "").isdigit():
        raise ValueError(f"{value!r} is not an IP address or host name")
    return value


class Peer(BaseModel):
    """A ``[peers]`` entry: ``"https://host:port"`` / ``"unix:/path"``, or a table with ``api`` and ``migration``.

    ``migration``: the address the source's QEMU connects to for the migration stream (an IP
    or host name; the port is the one the peer's prepare answer carries).  Default: the
    ``https`` URL's host; ``127.0.0.1`` for a ``unix:`` peer (same host).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    api: str
    migration: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _string_form(cls, v):
        return {"api": v} if isinstance(v, str) else v

    @field_validator("api")
    @classmethod
    def _api(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("must be 'https://HOST:PORT' or 'unix:/ABSOLUTE/PATH'")
        if v.startswith("unix:"):
            path = v[5:]
            if not path.startswith("/") or "\x00" in path or not path.isprintable():
                raise ValueError(f"{v!r}: a unix: peer needs an absolute socket path")
            return v
        m = re.fullmatch(r"https://(\[[0-9A-Fa-f:.]+\]|[^/:\[\]@?#]+):([0-9]{1,5})/?", v)
        if not m:
            raise ValueError(f"{v!r} must be 'https://HOST:PORT' or 'unix:/ABSOLUTE/PATH' (no http://)")
        _host(m.group(1).strip("[]"))
        if not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(f"{v!r}: port out of range")
        return v

    @field_validator("migration")
    @classmethod
    def _migration(cls, v: str | None) -> str | None:
        return None if v is None else _host(v)

    @property
    def is_https(self) -> bool:
        return self.api.startswith("https://")

    @property
    def target(self) -> str:
        """What PeerClient calls: the https base URL, or the unix socket path."""
        return self.api.rstrip("/") if self.is_https else self.api[5:]

    @property
    def migration_host(self) -> str:
        if self.migration:
            return self.migration
        if self.is_https:
            return self.api[8:].rstrip("/").rpartition(":")[0].strip("[]")
        return "127.0.0.1"


def _is_loopback_listen(listen: str) -> bool:
    return is_loopback_host(listen.rpartition(":")[0])


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path = Path("/var/lib/qsup")
    run_dir: Path = Path("/run/qsup")
    socket: Path = Path("/run/qsup/qsup.sock")
    hooks_dir: Path | None = Path("/etc/qsup/hooks")
    qemu: str = "qemu-system-x86_64"
    accel: str = "kvm"
    node_name: str = Field(default_factory=_socket.gethostname, min_length=1, max_length=63)
    migration_address: str = "127.0.0.1"
    #: without tls_*, a migration_address off loopback is refused unless this is true: the
    #: stream (guest RAM and device state) then crosses the network unencrypted and anyone who
    #: can reach the port during a migration may feed the destination a guest
    allow_plain_migration_network: StrictBool = False
    #: "host:port" of the TCP API: HTTPS with tls_*; plain HTTP only on a loopback address
    listen: str | None = None
    token_file: Path | None = None
    #: PEM files: the CA every node's certificate is signed by, this node's certificate (it
    #: must name node_name) and key.  With them ``listen`` serves HTTPS only (client cert or
    #: token), node-to-node calls and the migration stream use mutual TLS.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: node name -> "https://host:port" | "unix:/path" | {api = ..., migration = "host"};
    #: ``migrate --to`` names one of these, and credentials go to these only.
    peers: dict[str, Peer] = {}
    #: names a client certificate (signed by ``tls_ca``) may carry to get operator rights on
    #: ``listen``: every route.  A certificate naming a ``[peers]`` key is that peer (only its
    #: own migrations to this node); one naming neither is refused (403) everywhere.
    operators: list[str] = []
    on_shutdown: Literal["leave", "stop"] = "leave"
    #: lowest level logged (journald priorities: debug 7, info 6, warning 4, error 3, critical 2).
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    #: "host:port" of an unauthenticated listener serving only GET /metrics and /v1/health
    #: (for Prometheus and load-balancer checks); none by default.
    metrics_listen: str | None = None
    #: ``"per-instance"``: each QEMU runs as its own uid from ``qemu_uids``.
    #: ``""`` keeps QEMU as the daemon's user (root): only for tests and debugging.
    qemu_user: Literal["per-instance", ""] = "per-instance"
    #: each QEMU starts in a mount namespace of its own, in a read-only jail under
    #: ``<state_dir>/jail/<name>`` holding only /usr, the loader's files, a few device nodes,
    #: its own /proc, its disk and the TLS creds dir (supervisor/_jail.py); needs root.
    qemu_chroot: StrictBool = False
    #: post-copy destinations need userfaultfd, which QEMU 7.2 gets unprivileged only
    #: with vm.unprivileged_userfaultfd=1; true lets them run QEMU as root instead.
    allow_root_postcopy: bool = False
    #: seconds a guest gets to honour system_powerdown before ``quit``.
    powerdown_timeout: float = Field(default=30.0, ge=0, le=3600)
    #: seconds a guest has to release an unplugged disk (DEVICE_DELETED) before ``disk rm`` gives up
    unplug_timeout: float = Field(default=10.0, gt=0, le=600)
    #: HTTP: seconds a client has to send a request's complete header (and to sit idle between
    #: requests); a body must arrive within 30 s (408)
    http_header_timeout: float = Field(default=30.0, gt=0, le=3600)
    #: HTTP: requests served at once per listener (event followers included); more get 503
    http_max_requests: int = Field(default=256, ge=1, le=100_000)
    #: HTTP: live ``events --follow`` streams per listener; more get 503
    http_max_followers: int = Field(default=64, ge=1, le=10_000)
    #: HTTP: open connections per listener; one over it is accepted and closed at once
    http_max_connections: int = Field(default=512, ge=1, le=100_000)
    hook_timeout: float = Field(default=10.0, gt=0, le=3600)
    event_retention: int = Field(default=100_000, ge=100)
    #: seconds a prepared migration destination waits for the source to connect.
    incoming_timeout: float = Field(default=120.0, gt=0, le=86400)
    #: seconds a post-copy migration whose stream broke (``postcopy-paused``) keeps trying to
    #: resume it (``migrate-recover`` on the destination, ``migrate resume`` here); 0: never
    postcopy_recover_timeout: float = Field(default=120.0, ge=0, le=86400)
    #: uplinks on which a migration destination announces routed guests.
    announce_interfaces: list[str] = []
    #: what a guest kernel panic does unless its spec says: keep it paused for
    #: inspection (``pause``), ``stop`` it (undo its network), or ``restart`` it.
    on_panic: OnPanic = "pause"
    #: each instance's QEMU runs as its own uid from this "START-END" range (supervisor/_uids.py)
    qemu_uids: QemuUids = DEFAULT_QEMU_UIDS
    #: kernel/initrd/disk must lie inside one of these, reached without a symlink below the
    #: directory (supervisor/_images.py); ``["/"]`` allows any path and must be chosen explicitly
    image_dirs: ImageDirs = Field(default_factory=lambda: list(DEFAULT_IMAGE_DIRS))
    #: those of ``image_dirs`` (or directories inside them) that are shared storage: a disk
    #: beneath one is reopened by a migration destination (same path, same format and virtual
    #: size); every other disk is local and is copied over NBD (supervisor/_storage.py)
    shared_image_dirs: ImageDirs = []
    #: allow a block/character device as a disk
    allow_device_disks: bool = False
    #: disk used by one instance's console log (current + rotated ``.1``), in bytes
    console_max_bytes: int = Field(default=1024 * 1024, ge=4096, le=1024**4)

    @field_validator("hooks_dir", mode="before")
    @classmethod
    def _hooks_off(cls, v):
        return None if v in ("", None) else v

    @field_validator("accel")
    @classmethod
    def _accel(cls, v: str) -> str:
        if not ACCEL_RE.match(v):
            raise ValueError(f"invalid accelerator {v!r}")
        return v

    @field_validator("state_dir", "run_dir", "socket", "tls_ca", "tls_cert", "tls_key")
    @classmethod
    def _abs(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError(f"{str(v)!r} must be an absolute path")
        return v

    @field_validator("peers", mode="before")
    @classmethod
    def _peer_names(cls, v):
        if isinstance(v, dict):
            for k in v:
                if not isinstance(k, str) or not NODE_NAME_RE.match(k):
                    raise ValueError(f"invalid peer name {k!r} (a node name: {NAME_PATTERN})")
        return v

    @field_validator("operators")
    @classmethod
    def _operator_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not NODE_NAME_RE.match(name):
                raise ValueError(f"invalid certificate name {name!r} (a name: {NAME_PATTERN})")
        return v

    @property
    def tls(self) -> TlsFiles | None:
        if self.tls_ca and self.tls_cert and self.tls_key:
            return TlsFiles(self.tls_ca, self.tls_cert, self.tls_key)
        return None


def load_config(path: str | Path | None, **overrides) -> Config:
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise SpecError(f"cannot read config {str(path)!r}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path}: invalid TOML: {e}") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise SpecError(_message(err), _loc(err["loc"])) from None
    check_rules(cfg)
    return cfg


def check_rules(cfg: Config) -> None:
    """The rules between keys; SpecError naming the key."""
    given = [k for k in ("tls_ca", "tls_cert", "tls_key") if getattr(cfg, k) is not None]
    if given and len(given) < 3:
        missing = next(k for k in ("tls_ca", "tls_cert", "tls_key") if k not in given)
        raise SpecError(f"required with {given[0]} (tls_ca, tls_cert and tls_key go together)", missing)
    if cfg.listen:
        if cfg.tls is None and not _is_loopback_listen(cfg.listen):
            raise SpecError(f"{cfg.listen!r}: plain HTTP only on a loopback address; "
                            "set tls_ca, tls_cert and tls_key to listen elsewhere", "listen")
        if cfg.tls is None and not cfg.token_file:
            raise SpecError("required when listen is set without TLS", "token_file")
    both = sorted(set(cfg.operators) & set(cfg.peers))
    if both:
        raise SpecError(f"{both[0]!r} is a declared peer: a certificate is a peer or an operator, "
                        "not both", "operators")
    if cfg.tls is None and not is_loopback_host(cfg.migration_address) and not cfg.allow_plain_migration_network:
        raise SpecError(f"{cfg.migration_address!r}: without TLS the migration stream is plain "
                        "TCP, so only a loopback address unless allow_plain_migration_network "
                        "= true; or set tls_ca, tls_cert and tls_key", "migration_address")
    for i, shared in enumerate(cfg.shared_image_dirs):
        if locate(str(shared), cfg.image_dirs) is None:
            raise SpecError(f"{str(shared)!r} is not inside image_dirs (a shared image dir is one of "
                            "them, or a directory inside one)", f"shared_image_dirs[{i}]")
    for name, peer in cfg.peers.items():
        if peer.is_https and cfg.tls is None:
            raise SpecError("an https peer needs tls_ca, tls_cert and tls_key "
                            "(the peer's certificate is checked against tls_ca)", f"peers.{name}")
