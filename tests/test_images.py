"""The files qsup hands to QEMU (issue 16, finding 3): opened once, beneath an image dir, without
following a symlink, never blocking, checked on the fd that is passed.

Both ways of opening are run: ``openat2`` and the component-by-component walk a kernel without
it falls back to (``walk``).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest

from supervisor import SpecError, _images, parse_spec
from supervisor._disks import check_disks
from supervisor._limits import check_images


@pytest.fixture(params=["openat2", "walk"])
def how(request, monkeypatch):
    if request.param == "walk":
        monkeypatch.setattr(_images, "_openat2_usable", False)
    else:
        _images.open_beneath("/", "etc", os.O_PATH)  # probes openat2
        if not _images._openat2_usable:
            pytest.skip("this kernel has no openat2")
    return request.param


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    (d / "vm1").mkdir(parents=True)
    (d / "vm1" / "vmlinuz").write_bytes(b"kernel-1")
    (d / "vm1" / "initrd").write_bytes(b"initrd-1")
    (tmp_path / "secret").write_bytes(b"secret")
    return d


def spec(**kw):
    return parse_spec({"name": "vm1", "memory": 64, **kw})


def refused(fn, *a, **kw) -> SpecError:
    with pytest.raises(SpecError) as e:
        fn(*a, **kw)
    return e.value


def test_image_dirs_default_is_var_lib_qsup_images_and_any_path_is_explicit():
    from supervisor._config import load_config

    assert [str(d) for d in load_config(None).image_dirs] == ["/var/lib/qsup/images"]
    e = refused(check_images, spec(kernel="/etc/passwd"), load_config(None).image_dirs)
    assert e.field == "kernel" and "image_dirs" in str(e), e
    assert check_images(spec(kernel="/etc/passwd"), load_config(None, image_dirs=["/"]).image_dirs) == {
        "kernel": "/etc/passwd"}


def test_a_symlink_below_the_image_dir_is_never_followed(images, tmp_path, how):
    os.symlink(images / "vm1" / "vmlinuz", images / "inside")  # even one that stays inside
    os.symlink(tmp_path / "secret", images / "outside")
    os.symlink(images / "vm1", images / "dirlink")
    for name in ("inside", "outside", "dirlink/vmlinuz"):
        e = refused(check_images, spec(kernel=str(images / name)), [images])
        assert e.field == "kernel" and "symbolic link" in str(e), e
    # the image dir itself is the operator's: a symlink to it is fine
    os.symlink(images, tmp_path / "imglink")
    assert check_images(spec(kernel=str(tmp_path / "imglink" / "vm1" / "vmlinuz")), [tmp_path / "imglink"]) == {
        "kernel": str(images / "vm1" / "vmlinuz")}


def test_dotdot_may_not_leave_the_image_dir(images, how):
    e = refused(check_images, spec(kernel=str(images / ".." / "secret")), [images])
    assert e.field == "kernel" and "image_dirs" in str(e), e
    e = refused(check_images, spec(kernel=str(images / "vm1" / ".." / ".." / "secret")), [images])
    assert e.field == "kernel" and "image_dirs" in str(e), e
    assert check_images(spec(kernel=str(images / "vm1" / ".." / "vm1" / "vmlinuz")), [images]) == {
        "kernel": str(images / "vm1" / "vmlinuz")}


def test_missing_fifo_directory_and_device_refused_without_blocking(images, how):
    os.mkfifo(images / "fifo")
    t = time.monotonic()
    for path, words in ((images / "nope", "does not exist"), (images / "fifo", "FIFO"),
                        (images / "vm1", "directory"), (images / "vm1" / "vmlinuz" / "x", "not a directory")):
        e = refused(check_images, spec(kernel=str(path)), [images])
        assert e.field == "kernel" and words in str(e), e
    e = refused(check_images, spec(kernel="/dev/null"), ["/"])
    assert e.field == "kernel" and "device" in str(e), e
    # a disk is opened (with its chain) by supervisor._disks, by the same rule; a device only when allowed
    disks = spec(disks=[{"id": "d0", "path": "/dev/null", "format": "raw"}]).disks
    assert check_disks(disks, ["/dev"], allow_device=True) == [0]
    e = refused(check_disks, disks, ["/dev"])
    assert e.field == "disks[0].path" and "allow_device_disks" in str(e), e
    e = refused(check_disks, spec(disks=[{"id": "d0", "path": str(images / "fifo"), "format": "raw"}]).disks,
                [images])
    assert e.field == "disks[0].path" and "FIFO" in str(e), e
    assert time.monotonic() - t < 2


# -- kernel and initrd: the fd checked is the fd passed, as a sealed copy ----------------------------

def _read(f) -> bytes:
    return os.pread(f.fileno(), 1 << 20, 0)


def test_boot_files_are_sealed_copies_of_the_file_opened(images, how):
    paths = {"kernel": str(images / "vm1" / "vmlinuz"), "initrd": str(images / "vm1" / "initrd")}
    files = _images.open_boot_files(paths, [images], max_bytes=1 << 20)
    try:
        assert sorted(files) == ["initrd", "kernel"]
        assert _read(files["kernel"]) == b"kernel-1" and _read(files["initrd"]) == b"initrd-1"
        fd = files["kernel"].fileno()
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        for seal in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_SEAL):
            assert seals & seal, hex(seals)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"X", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        # what QEMU opens: /proc/self/fd/N of the copy, not the file (nor its permissions)
        (images / "vm1" / "vmlinuz").write_bytes(b"changed")
        os.chmod(images / "vm1" / "vmlinuz", 0)
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            assert f.read() == b"kernel-1"
        assert not os.get_inheritable(fd)  # QEMU gets it through pass_fds only
    finally:
        for f in files.values():
            f.close()


def test_a_boot_file_larger_than_the_guest_is_refused(images, how):
    e = refused(_images.open_boot_files, {"kernel": str(images / "vm1" / "vmlinuz")}, [images], max_bytes=4)
    assert e.field == "kernel" and "memory" in str(e), e


def test_a_fifo_is_refused_at_once_and_leaves_no_fd(images, how):
    os.mkfifo(images / "fifo")
    before = set(os.listdir("/proc/self/fd"))
    done = threading.Event()

    def unblock():  # on code that blocks in open(), this ends the wait after 3 s (the test then fails)
        if not done.wait(3):
            fd = os.open(images / "fifo", os.O_WRONLY)
            os.close(fd)

    threading.Thread(target=unblock, daemon=True).start()
    t = time.monotonic()
    e = refused(_images.open_boot_files, {"kernel": str(images / "vm1" / "vmlinuz"),
                                          "initrd": str(images / "fifo")}, [images], max_bytes=1 << 20)
    done.set()
    assert time.monotonic() - t < 1 and e.field == "initrd" and "FIFO" in str(e), e
    assert set(os.listdir("/proc/self/fd")) == before  # the kernel's copy was closed too


def test_an_image_dir_that_is_not_there_refuses_naming_the_field(tmp_path, how):
    e = refused(check_images, spec(kernel=str(tmp_path / "none" / "vmlinuz")), [tmp_path / "none"])
    assert e.field == "kernel", e
