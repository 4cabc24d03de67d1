"""Node configuration (``qsup serve --config PATH``, also ``qsup run --config``).

TOML, validated like the instance spec: unknown keys are refused and errors
name the key.  Every key has a default so ``qsup run`` works without a file.
"""

from __future__ import annotations

import socket as _socket
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._spec import ACCEL_RE, SpecError, _loc, _message
from ._limits import ImageDirs
from ._uids import DEFAULT_QEMU_UIDS, QemuUids


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
    listen: str | None = None  # "host:port" for node-to-node calls (needs token_file)
    token_file: Path | None = None
    on_shutdown: Literal["leave", "stop"] = "leave"
    #: lowest level logged (journald priorities: debug 7, info 6, warning 4, error 3, critical 2).
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    #: "host:port" of an unauthenticated listener serving only GET /metrics and /v1/health
    #: (for Prometheus and load-balancer checks); none by default.
    metrics_listen: str | None = None
    #: QEMU drops to this user after opening its sockets and files (``-runas``);
    #: empty string keeps it root (needed e.g. for post-copy's userfaultfd).
    qemu_user: str = "nobody"
    #: seconds a guest gets to honour system_powerdown before ``quit``.
    powerdown_timeout: float = Field(default=30.0, ge=0, le=3600)
    hook_timeout: float = Field(default=10.0, gt=0, le=3600)
    event_retention: int = Field(default=100_000, ge=100)
    #: seconds a prepared migration destination waits for the source to connect.
    incoming_timeout: float = Field(default=120.0, gt=0, le=86400)
    #: uplinks on which a migration destination announces routed guests.
    announce_interfaces: list[str] = []
    #: what a guest kernel panic does unless its spec says: keep it paused for
    #: inspection (``pause``), ``stop`` it (undo its network), or ``restart`` it.
    on_panic: Literal["pause", "stop", "restart"] = "pause"
    #: each instance's QEMU runs as its own uid from this "START-END" range (supervisor/_uids.py)
    qemu_uids: QemuUids = DEFAULT_QEMU_UIDS
    #: kernel/initrd/disk must resolve inside one of these; None allows any regular file
    image_dirs: ImageDirs = None
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

    @field_validator("state_dir", "run_dir", "socket")
    @classmethod
    def _abs(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"{str(v)!r} must be an absolute path")
        return v


def load_config(path: str | Path | None, **overrides) -> Config:
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise SpecError("", f"cannot read config {str(path)!r}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise SpecError("", f"{path}: invalid TOML: {e}") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise SpecError(_loc(err["loc"]), _message(err)) from None
    if cfg.listen and not cfg.token_file:
        raise SpecError("token_file", "required when listen is set")
    return cfg
