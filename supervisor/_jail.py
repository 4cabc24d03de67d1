"""The optional per-instance jail for QEMU (``qemu_chroot = true``).

With it, each QEMU starts in a mount namespace of its own whose root is a small read-only
tmpfs holding only what QEMU needs, bind-mounted at the host's paths:

* ``/usr`` (read-only, nosuid, nodev) and the top-level ``/bin``, ``/sbin``, ``/lib*`` of the
  host (recreated as the same symlinks on a merged-``/usr`` system, bound read-only where
  they are real directories), ``/etc/ld.so.cache``, and the QEMU binary when it lives
  outside ``/usr``;
* ``/dev/null``, ``/dev/zero``, ``/dev/random``, ``/dev/urandom`` and ``/dev/kvm`` when the
  accelerator is KVM -- each a single bind, no other device node;
* a fresh ``/proc`` showing only process directories (``subset=pid``) and only QEMU's own
  processes (``hidepid=invisible``): kernel and initrd reach QEMU as ``/proc/self/fd/N``;
* no disk image: disks and their backing files reach QEMU as descriptors (fdsets,
  supervisor/_disks.py), like kernel and initrd;
* with ``tls_*`` set, ``<run_dir>/tls`` read-only: :mod:`supervisor._tls` writes QEMU's
  creds directory in it only while a migration's ``object-add`` loads it, after QEMU started,
  so the *parent* is bound (a bind of a directory shows entries created later).  Another
  instance's creds directory there is 0750 root:<its gid>, unreadable to this QEMU.

Nothing else of the host is reachable: not the state dir, not ``/run``, ``/home``, ``/tmp``
or ``/etc``.  Taps, monitors, console and log are file descriptors already.

How it is built: :meth:`JailPlan.command` runs ``python -I -m supervisor._jail PLAN -- QEMU
ARGV...`` instead of QEMU.  That helper is a fresh single-threaded process: the daemon is
multi-threaded, so no ``preexec_fn``; QEMU 7.2's own ``-chroot`` would need QEMU to start as
root and drop with ``-runas``, which its seccomp sandbox kills (docs/ARCHITECTURE.md).  The
helper calls ``unshare(CLONE_NEWNS)``, makes ``/`` rprivate (nothing it mounts can reach the
host), opens every bind source (``O_PATH|O_NOFOLLOW``; a bind with an inode must still be the
inode the daemon saw), mounts the tmpfs on the instance's jail directory ``<state_dir>/jail/<name>``,
binds, mounts ``/proc``, remounts the tmpfs read-only, moves its root into it
(``pivot_root``) and detaches the old root -- so QEMU's namespace holds only the jail's mounts
and pins no other host filesystem -- then ``setgroups([])``, ``setresgid``, ``setresuid``
(checked, and a way back to root must fail), sets ``no_new_privs`` and executes QEMU
(``execve``) with the scrubbed environment.  The file descriptors QEMU is to inherit stay
open across both execs, and the pid stays QEMU's.  Any failure: one line ``qsup jail
(qemu_chroot): STEP: ...`` on stderr (QEMU's log) and exit status :data:`EXIT_STATUS`,
before QEMU ever runs; the start then fails naming ``qemu_chroot``.

The mounts live in QEMU's private namespace and vanish with its last process: nothing to
unmount on the host.  What is left there is the empty mount-point directory
``<state_dir>/jail/<name>`` (0700), removed by the instance's teardown with ``rmdir`` --
never recursively, so a mistake can never delete through a mount.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import FieldError

#: what the helper's one line of error starts with (the start's error then names ``qemu_chroot``)
MARK = "qsup jail (qemu_chroot):"
#: the helper's exit status when the jail could not be built or QEMU could not be executed
EXIT_STATUS = 125

#: host paths bound read-only when they are directories; recreated when they are symlinks
ROOT_ENTRIES = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_DIRS = ("/usr",)
SYSTEM_FILES = ("/etc/ld.so.cache",)
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
KVM = "/dev/kvm"
#: a qcow2 backing chain longer than this is not followed further


class JailError(FieldError, RuntimeError):
    """The jail can't be planned; ``field`` is the config key, ``qemu_chroot``."""

    def __init__(self, message: str, field: str = "qemu_chroot"):
        super().__init__(message, field)


# -- the plan (daemon side) ------------------------------------------------------------------

@dataclass(frozen=True)
class Bind:
    """``path`` of the host, bound at the same path in the jail.

    ``ino``: the (st_dev, st_ino) the daemon saw; the helper refuses another inode there.
    """

    path: str
    rw: bool = False
    ino: tuple[int, int] | None = None


@dataclass(frozen=True)
class JailPlan:
    root: str
    exe: str
    binds: tuple[Bind, ...]
    symlinks: tuple[tuple[str, str], ...] = ()
    env: dict = field(default_factory=dict)

    def to_json(self, uid: int | None = None, gid: int | None = None) -> str:
        return json.dumps({
            "root": self.root, "exe": self.exe, "env": self.env, "uid": uid, "gid": gid,
            "binds": [{"path": b.path, "rw": b.rw, "ino": list(b.ino) if b.ino else None} for b in self.binds],
            "symlinks": [list(s) for s in self.symlinks],
        }, separators=(",", ":"))

    def command(self, qemu_argv: list[str], *, uid: int | None, gid: int | None) -> list[str]:
        """The argv to spawn instead of QEMU's: every path is an argv/JSON element, no shell."""
        return [sys.executable, "-I", "-m", __name__, self.to_json(uid, gid), "--", *qemu_argv]


def jail_dir(state_dir: str | os.PathLike, name: str) -> Path:
    """``<state_dir>/jail/<name>``; a name that would leave it is refused (``ValueError``)."""
    from ._records import inside

    return inside(Path(state_dir) / "jail", name)


def _under(path: str, dirs) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def resolve_exe(qemu: str, path_env: str) -> str:
    """The QEMU binary as an absolute, resolved path (the helper executes exactly this)."""
    found = qemu if "/" in qemu else shutil.which(qemu, path=path_env)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise JailError(f"QEMU binary {qemu!r} not found (PATH={path_env})")
    return os.path.realpath(found)


def build_plan(root: str | os.PathLike, *, exe: str,
               tls_dir: str | os.PathLike | None = None, kvm: bool = False, env: dict | None = None,
               host: str = "/") -> JailPlan:
    """What the jail of one QEMU holds.  ``host``: where to look at the host's ``/`` (tests)."""
    def h(p: str) -> str:
        return os.path.join(host, p.lstrip("/"))

    binds: dict[str, Bind] = {}
    symlinks = []
    for p in ROOT_ENTRIES:
        if os.path.islink(h(p)):
            symlinks.append((p, os.readlink(h(p))))
        elif os.path.isdir(h(p)):
            binds[p] = Bind(p)
    for p in SYSTEM_DIRS + SYSTEM_FILES:
        if os.path.exists(h(p)):
            binds[p] = Bind(p)
    # a read-only mount restricts no device node: they are bound as they are
    for p in DEVICES + ((KVM,) if kvm else ()):
        if os.path.exists(h(p)):
            binds[p] = Bind(p, rw=True)
    ro_dirs = [p for p, b in binds.items() if not b.rw and os.path.isdir(h(p))]
    if not _under(exe, ro_dirs):
        binds[exe] = Bind(exe)
    if tls_dir is not None:
        binds[os.fspath(tls_dir)] = Bind(os.fspath(tls_dir))
    # parents before children: a bind under /usr goes over /usr's read-only bind
    ordered = sorted(binds.values(), key=lambda b: (b.path.count("/"), b.path))
    return JailPlan(root=os.fspath(root), exe=exe, binds=tuple(ordered), symlinks=tuple(symlinks),
                    env=dict(env or {}))


def plan_for(spec, cfg, env: dict) -> JailPlan:
    """The jail of ``spec``'s QEMU on a node with config ``cfg``; creates its mount point."""
    try:
        exe = resolve_exe(cfg.qemu, env.get("PATH", ""))
        tls_dir = None
        if cfg.tls is not None:  # QEMU's creds dirs appear in it at migration time (supervisor/_tls.py)
            from ._tls import make_qemu_creds_root, qemu_creds_root  # not at import: the helper needs neither

            tls_dir = qemu_creds_root(cfg.run_dir)
            make_qemu_creds_root(tls_dir)
        accel = spec.accel or cfg.accel
        plan = build_plan(jail_dir(cfg.state_dir, spec.name), exe=exe, tls_dir=tls_dir,
                          kvm=accel == "kvm", env=env)
        prepare_dir(Path(plan.root))
    except OSError as e:
        raise JailError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None
    return plan


def prepare_dir(path: Path) -> None:
    """Create the instance's jail mount point: ``<state_dir>/jail`` and it, both 0700 root.

    One left by a crash is reused if empty; a non-empty one is refused (and left alone).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir() or path.is_symlink() or any(path.iterdir()):
            raise JailError(f"{str(path)!r} exists and is not an empty directory; "
                            "left as it is (remove it by hand)") from None
    os.chmod(path, 0o700)


def remove_dir(path: Path) -> bool:
    """Remove the empty mount-point directory (``rmdir``: never recursively).  False if it stays."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


# -- the helper (a fresh process, as root, before QEMU) ----------------------------------------

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
#: mount flags a bind inherits from its source and a remount must repeat
_KEEP = {os.ST_RDONLY: MS_RDONLY, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
         os.ST_NOATIME: 1024, os.ST_NODIRATIME: 2048, os.ST_RELATIME: 1 << 21}
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


class _Fail(Exception):
    pass


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc, ctypes


def _enc(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


class _Sys:
    def __init__(self):
        self.libc, self.ctypes = _libc()

    def _check(self, rc: int, step: str) -> None:
        if rc != 0:
            raise _Fail(f"{step}: {os.strerror(self.ctypes.get_errno())}")

    def mount(self, src, target, fstype, flags, data, step):
        self._check(self.libc.mount(_enc(src), _enc(target), _enc(fstype), flags, _enc(data)), step)

    def unshare(self, flags):
        self._check(self.libc.unshare(flags), "unshare(CLONE_NEWNS)")

    def umount2(self, target, flags, step):
        self._check(self.libc.umount2(_enc(target), flags), step)

    def pivot_root(self, new, old):
        import platform

        nr = _SYS_PIVOT_ROOT.get(platform.machine())
        if nr is None:
            raise _Fail(f"pivot_root: unknown syscall number on {platform.machine()}")
        self._check(self.libc.syscall(nr, _enc(new), _enc(old)), "pivot_root")

    def no_new_privs(self):
        self._check(self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _open_sources(binds: list[dict]) -> list[tuple[dict, int, os.stat_result]]:
    """Open every bind source before anything is mounted (``O_PATH|O_NOFOLLOW``)."""
    out = []
    for b in binds:
        path = b["path"]
        if not os.path.isabs(path):
            raise _Fail(f"bind {path!r}: not an absolute path")
        try:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise _Fail(f"open {path}: {e.strerror}") from None
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            raise _Fail(f"open {path}: is a symbolic link")
        if b.get("ino") and [st.st_dev, st.st_ino] != list(b["ino"]):
            raise _Fail(f"open {path}: not the file the daemon checked (replaced since?)")
        out.append((b, fd, st))
    return out


def _mountpoint(target: str, is_dir: bool) -> None:
    """An empty directory or file at ``target`` inside the jail's tmpfs (or the one already there)."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if is_dir:
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        return
    if stat.S_ISDIR(st.st_mode) != is_dir or stat.S_ISLNK(st.st_mode):
        raise _Fail(f"mount point {target}: exists as another type")


def build(plan: dict, sys_: _Sys | None = None) -> None:
    """Build the jail and enter it (this process: root, then the instance's uid)."""
    s = sys_ or _Sys()
    root = plan["root"]
    os.umask(0o022)
    rst = os.lstat(root) if os.path.lexists(root) else None
    if rst is None or not stat.S_ISDIR(rst.st_mode):
        raise _Fail(f"jail directory {root}: missing or not a directory")
    s.unshare(CLONE_NEWNS)
    s.mount(None, "/", None, MS_REC | MS_PRIVATE, None, "make / rprivate")
    # opened in the new namespace (a bind's source must be a mount of the caller's namespace),
    # and before the tmpfs covers the jail directory
    sources = _open_sources(plan["binds"])
    s.mount(root, root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m,nr_inodes=4096",
            f"mount tmpfs on {root}")
    for b, fd, st in sources:
        target = os.path.join(root, b["path"].lstrip("/"))
        try:
            _mountpoint(target, stat.S_ISDIR(st.st_mode))
        except OSError as e:
            raise _Fail(f"mount point for {b['path']}: {e.strerror}") from None
        s.mount(f"/proc/self/fd/{fd}", target, None, MS_BIND, None, f"bind {b['path']}")
        device = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        inherited = os.statvfs(target).f_flag
        flags = MS_BIND | MS_REMOUNT | MS_NOSUID | sum(m for f, m in _KEEP.items() if inherited & f)
        if not device:
            flags |= MS_NODEV
        if not b.get("rw"):
            flags |= MS_RDONLY
        s.mount(None, target, None, flags, None, f"remount {b['path']} {'rw' if b.get('rw') else 'ro'}")
        os.close(fd)
    for path, dest in plan.get("symlinks", ()):
        os.symlink(dest, os.path.join(root, path.lstrip("/")))
    proc = os.path.join(root, "proc")
    os.makedirs(proc, 0o755, exist_ok=True)
    s.mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible,subset=pid",
            "mount /proc")
    s.mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None,
            f"remount {root} read-only")
    os.chdir(root)
    s.pivot_root(".", ".")
    s.umount2(".", MNT_DETACH, "detach the old root")
    os.chdir("/")
    _drop(plan.get("uid"), plan.get("gid"))
    s.no_new_privs()


def _drop(uid: int | None, gid: int | None) -> None:
    if uid is None:
        return
    gid = uid if gid is None else gid
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise _Fail(f"drop to uid {uid} gid {gid}: {e.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise _Fail(f"drop to uid {uid} gid {gid}: did not stick")
    if uid != 0:
        try:
            os.setresuid(0, 0, 0)
        except PermissionError:
            return
        raise _Fail(f"drop to uid {uid}: could become root again")


def main(argv: list[str]) -> int:
    try:
        if len(argv) < 3 or argv[1] != "--":
            raise _Fail("usage: python -I -m supervisor._jail PLAN-JSON -- QEMU-ARGV...")
        try:
            plan = json.loads(argv[0])
            exe, env = plan["exe"], plan["env"]
        except (ValueError, KeyError, TypeError) as e:
            raise _Fail(f"bad plan: {e}") from None
        build(plan)
        try:
            os.execve(exe, argv[2:], env)
        except OSError as e:
            raise _Fail(f"exec {exe}: {e.strerror}") from None
    except _Fail as e:
        print(f"{MARK} {e}", file=sys.stderr, flush=True)
        return EXIT_STATUS
    except OSError as e:
        print(f"{MARK} {e}", file=sys.stderr, flush=True)
        return EXIT_STATUS
    return EXIT_STATUS  # not reached: execve replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
