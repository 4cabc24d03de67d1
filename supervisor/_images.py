"""The files qsup opens for QEMU: beneath an image dir, no symlink followed, never blocking.

One rule for every such file -- a spec's ``kernel``, ``initrd`` and ``disk`` when the node
checks them (:func:`supervisor._limits.check_images`), kernel and initrd again when QEMU is
launched (:func:`open_boot_files`), the files of a qcow2 backing chain the jail binds
(:func:`supervisor._jail.disk_chain`):

* the path must lie inside one of ``image_dirs``.  The image dir itself is the operator's and
  is opened as configured (it may be a symlink); below it nothing is followed: ``openat2``
  with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` (syscall 437), or -- on a kernel without it --
  a walk one component at a time with ``O_NOFOLLOW``, refusing the same.  ``..`` may not leave
  the image dir;
* ``O_NONBLOCK``: a FIFO opens at once instead of blocking the thread until a writer comes;
* ``fstat`` on the descriptor opened: a regular file; a block/character device only as
  ``disk`` and only with ``allow_device_disks``.

The check opens with ``O_PATH`` (it reads nothing and opens no device); the launch opens
kernel and initrd for reading and copies *that* descriptor's content into a sealed memfd
(:func:`sealed_copy`), which QEMU gets as ``/proc/self/fd/N``.  QEMU 7.2 has no fd option for
``-kernel``/``-initrd`` and reopens that path with its own uid: the reopen of a memfd needs
no permission on the original file (docs/ARCHITECTURE.md, "QEMU isolation").  All of it is
blocking file I/O: the node runs it on worker threads, never on the trio thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import io
import os
import platform
import stat
from collections.abc import Iterable, Mapping

from ._spec import SpecError

RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: openat2(2): the same number in the syscall table every 64-bit architecture shares since 5.6
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "riscv64": 437, "ppc64le": 437, "s390x": 437}
#: None: not tried yet; False: this kernel (or a seccomp filter) has no openat2 -- walk instead
_openat2_usable: bool | None = None

_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
_CHUNK = 1 << 24
#: what QEMU is handed these as (kernel and initrd only: QEMU opens a disk by path itself)
BOOT_FIELDS = ("kernel", "initrd")


class MissingImage(SpecError):
    """The file is not there (a qcow2 backing file that is missing is QEMU's to name)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _openat2(dirfd: int, rel: str, flags: int) -> int | None:
    """``openat2(dirfd, rel, {flags, RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS})``; None if unavailable."""
    global _openat2_usable
    nr = _SYS_OPENAT2.get(platform.machine())
    if _openat2_usable is False or nr is None:
        return None
    libc = _libc()
    how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(rel)),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd >= 0:
        _openat2_usable = True
        return fd
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        _openat2_usable = False
        return None
    raise OSError(err, os.strerror(err))


def _walk(dirfd: int, rel: str, flags: int) -> int:
    """What :func:`_openat2` does, by hand: each directory opened ``O_PATH|O_NOFOLLOW`` from the last."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    stack = [os.dup(dirfd)]
    try:
        for i, part in enumerate(parts):
            if part == "..":
                if len(stack) == 1:
                    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
                os.close(stack.pop())
                continue
            if i == len(parts) - 1:
                fd = os.open(part, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH opens the link itself
                    os.close(fd)
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                return fd
            fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            stack.append(fd)
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            if not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=stack[-1])  # rel ended in the dir itself
    finally:
        for fd in stack:
            os.close(fd)


def open_beneath(root: str, rel: str, flags: int) -> int:
    """Open ``rel`` below the directory ``root`` without following any symlink or leaving ``root``."""
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _openat2(dirfd, rel or ".", flags | os.O_CLOEXEC)
        return _walk(dirfd, rel, flags) if fd is None else fd
    finally:
        os.close(dirfd)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def locate(path: str, roots: Iterable[str | os.PathLike]) -> tuple[str, str] | None:
    """``(image dir, path below it)`` for the image dir ``path`` lies in, the deepest one; None if none.

    Compared as written (an image dir also matches under its resolved name); ``..`` in the
    rest is left to :func:`open_beneath`, which never lets it leave the image dir.
    """
    if not os.path.isabs(path):
        return None
    mine = _parts(path)
    best: tuple[str, str] | None = None
    depth = -1
    for root in roots:
        for form in dict.fromkeys((os.path.normpath(os.fspath(root)), os.path.realpath(root))):
            theirs = _parts(form)
            if mine[:len(theirs)] == theirs and len(theirs) > depth:
                best, depth = (form, "/".join(mine[len(theirs):])), len(theirs)
    return best


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_image(field: str, path: str, roots: Iterable[str | os.PathLike], *, flags: int = os.O_PATH,
               allow_device: bool = False, what: str | None = None) -> tuple[int, os.stat_result, str]:
    """Open ``path`` by the rule above: ``(fd, its fstat, the path as opened)``, or SpecError(``field``).

    ``flags``: ``O_PATH`` to check, ``O_RDONLY`` to read (``O_NONBLOCK|O_NOCTTY`` are added).
    The path returned is the image dir's resolved name joined with the rest: no symlink in it.
    ``what``: how the path is named in an error (default: ``path`` itself, quoted).
    """
    roots = list(roots)
    shown = what or repr(path)
    found = locate(path, roots)
    if found is None:
        dirs = ", ".join(repr(os.fspath(r)) for r in roots) or "none"
        raise SpecError(f"{shown} is not inside image_dirs ({dirs})", field)
    root, rel = found
    try:  # (openat2 refuses O_PATH with any other flag; O_PATH never blocks anyway)
        fd = open_beneath(root, rel, flags if flags & os.O_PATH else flags | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise MissingImage(f"{shown} does not exist", field) from None
        if e.errno == errno.ELOOP:
            raise SpecError(f"{shown}: a symbolic link below the image dir is not followed "
                            "(name the file itself)", field) from None
        if e.errno == errno.EXDEV:
            raise SpecError(f"{shown} leaves its image dir {root!r} (not inside image_dirs)", field) from None
        if e.errno == errno.ENOTDIR:
            raise SpecError(f"{shown}: a part of the path is not a directory", field) from None
        raise SpecError(f"{shown}: {e.strerror}", field) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
            if field != "disk":
                raise SpecError(f"{shown} is a device node, not a regular file", field)
            if not allow_device:
                raise SpecError(f"{shown} is a device node (allowed only with allow_device_disks = true)", field)
        elif not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{shown} is {_kind(st.st_mode)}, not a regular file", field)
    except BaseException:
        os.close(fd)
        raise
    real = os.path.realpath(root)
    return fd, st, os.path.normpath(os.path.join(real, rel)) if rel else real


def check_image(field: str, path: str, roots: Iterable[str | os.PathLike], allow_device: bool = False) -> str:
    """The node's check (``O_PATH``: nothing read, no device opened): the path as opened."""
    fd, _, opened = open_image(field, path, roots, allow_device=allow_device)
    os.close(fd)
    return opened


def sealed_copy(fd: int, name: str, max_bytes: int) -> int:
    """A memfd holding what ``fd`` holds (up to ``max_bytes``; more: ValueError), sealed: nobody,
    QEMU included, can write, grow or shrink it.  Close-on-exec: QEMU gets it through ``pass_fds``."""
    mfd = os.memfd_create(f"qsup-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        offset = 0
        while True:
            try:
                n = os.sendfile(mfd, fd, offset, min(_CHUNK, max_bytes + 1 - offset))
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                n = os.write(mfd, os.pread(fd, min(_CHUNK, max_bytes + 1 - offset), offset))
            if n == 0:
                break
            offset += n
            if offset > max_bytes:
                raise ValueError(f"more than {max_bytes} bytes")
        fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(mfd)
        raise
    return mfd


def open_boot_files(paths: Mapping[str, str | None], roots: Iterable[str | os.PathLike], *,
                    max_bytes: int) -> dict[str, io.FileIO]:
    """``kernel``/``initrd`` of ``paths`` opened once each (read, non-blocking, beneath ``roots``,
    checked on the fd) and copied into sealed memfds: ``{field: the memfd}``; the originals are
    closed.  ``max_bytes``: the guest's memory (QEMU could not load a bigger file)."""
    roots = list(roots)
    out: dict[str, io.FileIO] = {}
    try:
        for field in BOOT_FIELDS:
            path = paths.get(field)
            if not path:
                continue
            fd, st, _ = open_image(field, path, roots, flags=os.O_RDONLY)
            try:
                if st.st_size > max_bytes:
                    raise ValueError
                mfd = sealed_copy(fd, field, max_bytes)
            except ValueError:
                raise SpecError(f"{path!r} is larger than the guest's memory ({max_bytes >> 20} MiB): "
                                "QEMU could not load it", field) from None
            except OSError as e:
                raise SpecError(f"{path!r}: cannot read it: {e.strerror}", field) from None
            finally:
                os.close(fd)
            out[field] = io.FileIO(mfd, "rb", closefd=True)
    except BaseException:
        for f in out.values():
            f.close()
        raise
    return out
