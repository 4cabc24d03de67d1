"""The QEMU command line, built as an argv list (never a shell string).

Why these options:

* ``-S``: the guest CPUs stay stopped until qsup has configured the NICs and
  sends ``cont``, so the guest never runs without its network.
* ``-netdev tap,fd=N`` / ``fds=a:b``: qsup opens the tap itself and passes
  the fd, so it always knows which tap belongs to which NIC and QEMU needs no
  privilege to create one.  ``vhost=off``: these hosts have no vhost-net.
* Two QMP monitors on unix socket *paths*: the supervisor's own (a path, so
  a restarted daemon can reconnect) and one for operators (``qsup qmp``).
* ``-runas``: QEMU opens its sockets and files as root, then drops to an
  unprivileged user before running the guest.
* ``-device pvpanic-pci`` + ``-action panic=pause``: without it a panicked
  guest looks ``running`` forever.
* ``-incoming defer`` for a migration destination (with ``-S``: see
  DESIGN.md, the destination must not run before ``completed``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._config import Config
from ._console import console_chardev_args
from ._qemuopt import qemu_opt_value
from ._records import Layout
from ._spec import InstanceSpec


@dataclass(frozen=True)
class NicFds:
    """A NIC's tap as QEMU should see it."""

    mac: str
    fds: tuple[int, ...]
    vnet_hdr: bool


def build_argv(
    spec: InstanceSpec,
    cfg: Config,
    layout: Layout,
    nics: list[NicFds],
    *,
    incoming: bool = False,
    run_as: str | None = None,
    images: dict[str, str] | None = None,
) -> list[str]:
    """``images``: the kernel/initrd/disk paths as checked (symlinks resolved), else the spec's."""
    name = spec.name
    images = images or {}
    kernel, initrd, disk = (images.get(k) or getattr(spec, k) for k in ("kernel", "initrd", "disk"))
    accel = spec.accel or cfg.accel
    argv = [
        cfg.qemu,
        "-name", f"guest={name},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "pc",
        "-accel", accel,
        "-m", str(spec.memory),
        "-smp", str(spec.vcpus),
        "-chardev", f"socket,id=qsup-qmp,path={qemu_opt_value(layout.qmp_path(name))},server=on,wait=off",
        "-mon", "chardev=qsup-qmp,mode=control",
        "-chardev", f"socket,id=op-qmp,path={qemu_opt_value(layout.operator_qmp_path(name))},server=on,wait=off",
        "-mon", "chardev=op-qmp,mode=control",
        # the console goes to qsup, which keeps a capped log (a guest can't fill the disk)
        *console_chardev_args(layout.console_socket_path(name)),
        # a guest kernel panic reaches QMP as GUEST_PANICKED; QEMU pauses the
        # guest and qsup applies the instance's on_panic policy
        "-device", "pvpanic-pci",
        "-action", "panic=pause",
        "-S",
    ]
    if kernel:
        argv += ["-kernel", kernel]
        if initrd:
            argv += ["-initrd", initrd]
        if spec.append:
            argv += ["-append", spec.append]
    else:
        fmt = "qcow2" if disk.endswith(".qcow2") else "raw"
        argv += ["-drive", f"file={qemu_opt_value(disk)},if=virtio,format={fmt},cache=none,aio=threads"]
    for i, nic in enumerate(nics):
        q = len(nic.fds)
        if q == 1:
            netdev = f"tap,id=net{i},fd={nic.fds[0]},vhost=off"
        else:
            netdev = f"tap,id=net{i},fds={':'.join(map(str, nic.fds))},vhost=off"
        if not nic.vnet_hdr:
            netdev += ",vnet_hdr=off"
        dev = f"virtio-net-pci,netdev=net{i},mac={nic.mac},id=nic{i}"
        if q > 1:
            dev += f",mq=on,vectors={2 * q + 2}"
        argv += ["-netdev", netdev, "-device", dev]
    if incoming:
        argv += ["-incoming", "defer"]
    if run_as:
        argv += ["-runas", run_as]
    return argv
