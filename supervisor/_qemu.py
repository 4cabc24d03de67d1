"""The QEMU command line, built as an argv list (never a shell string).

Why these options:

* ``-S``: the guest CPUs stay stopped until qsup has configured the NICs and
  sends ``cont``, so the guest never runs without its network.
* ``-netdev tap,fd=N`` / ``fds=a:b``: qsup opens the tap itself and passes
  the fd, so it always knows which tap belongs to which NIC and QEMU needs no
  privilege to create one.  ``vhost=off``: these hosts have no vhost-net.
* Two QMP monitors on unix socket *paths*: the supervisor's own (a path, so
  a restarted daemon can reconnect) and one for operators (``qsup qmp``).
* no ``-runas``: qsup starts QEMU as the instance's own uid (one per
  instance, from ``qemu_uids``) under QEMU's seccomp sandbox; everything
  QEMU needs from the host -- taps, monitors, console, kernel, initrd, its
  log -- is opened by qsup and passed as an fd.
* ``-device pvpanic-pci`` + ``-action panic=pause``: without it a panicked
  guest looks ``running`` forever.
* disks as fdsets and an explicit ``-blockdev`` graph (supervisor/_disks.py): no image
  path reaches QEMU; ``-blockdev``/``-device`` take JSON, so no value is ever parsed as
  QEMU's option syntax.
* a fixed PCI slot (``addr=``) per device, from the spec (``InstanceSpec.with_layout``), and
  the recorded versioned ``-machine``: a destination, a reattach or an upgrade gets the same
  machine and device layout.
* ``-incoming defer`` for a migration destination (with ``-S``: see
  docs/ARCHITECTURE.md, the destination must not run before ``completed``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from ._config import Config
from ._console import CHARDEV_ID as CONSOLE_ID
from ._disks import OpenDisk, blockdevs, device, node_name
from ._records import Layout
from ._spec import PVPANIC_SLOT, InstanceSpec


@dataclass(frozen=True)
class NicFds:
    """A NIC's tap as QEMU should see it."""

    mac: str
    fds: tuple[int, ...]
    vnet_hdr: bool
    pci_slot: int | None = None


@dataclass(frozen=True)
class HostFds:
    """What qsup opens for QEMU and passes as fds, so QEMU needs no path on the host.

    The monitors and the console are unix sockets qsup binds and QEMU listens
    on (``-chardev socket,fd=N``): they outlive a daemon restart like a path
    QEMU bound would, and an unprivileged QEMU needs no access to the run
    dir.  Kernel and initrd are sealed memfd copies of the files qsup opened
    (supervisor/_images.py), named ``/proc/self/fd/N``: QEMU reopens that path with its own
    uid, which a memfd allows whatever the original file's permissions.
    """

    qmp: int
    operator_qmp: int
    console: int
    kernel: int | None = None
    initrd: int | None = None

    def all(self) -> list[int]:
        return [fd for fd in (self.qmp, self.operator_qmp, self.console, self.kernel, self.initrd)
                if fd is not None]


#: QEMU's own seccomp filter.  Not combinable with ``-runas`` on 7.2 (SIGSYS at the
#: uid switch), which is why qsup drops to the instance's uid before exec instead.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def build_argv(
    spec: InstanceSpec,
    cfg: Config,
    layout: Layout,
    nics: list[NicFds],
    *,
    host: HostFds,
    incoming: bool = False,
    disks: Sequence[OpenDisk] = (),
) -> list[str]:
    """``disks``: the spec's disks, opened (their fds go to QEMU in fdsets 1, 2, ... in order)."""
    name = spec.name
    accel = spec.accel or cfg.accel
    argv = [
        cfg.qemu,
        "-name", f"guest={name},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", spec.machine or "pc",
        "-accel", accel,
        "-m", str(spec.memory),
        "-smp", str(spec.vcpus),
        "-sandbox", SANDBOX,
        "-chardev", f"socket,id=qsup-qmp,fd={host.qmp},server=on,wait=off",
        "-mon", "chardev=qsup-qmp,mode=control",
        "-chardev", f"socket,id=op-qmp,fd={host.operator_qmp},server=on,wait=off",
        "-mon", "chardev=op-qmp,mode=control",
        # the console goes to qsup, which keeps a capped log (a guest can't fill the disk)
        "-chardev", f"socket,id={CONSOLE_ID},fd={host.console},server=on,wait=off",
        "-serial", f"chardev:{CONSOLE_ID}",
        # a guest kernel panic reaches QMP as GUEST_PANICKED; QEMU pauses the
        # guest and qsup applies the instance's on_panic policy
        "-device", f"pvpanic-pci,addr={PVPANIC_SLOT:#x}",
        "-action", "panic=pause",
        "-S",
    ]
    if host.kernel is not None:
        argv += ["-kernel", f"/proc/self/fd/{host.kernel}"]
        if host.initrd is not None:
            argv += ["-initrd", f"/proc/self/fd/{host.initrd}"]
        if spec.append:
            argv += ["-append", spec.append]
    fdset = 0
    for od in disks:
        sets = []
        for f in od.files:
            fdset += 1
            sets.append(fdset)
            # opaque: the file node's name, so query-fdsets tells whose set it is (a hotplug's too)
            argv += ["-add-fd", f"fd={f.fd},set={fdset},opaque={node_name(od.spec.id, f.depth, 'file')}"]
        for node in blockdevs(od, sets):
            argv += ["-blockdev", json.dumps(node, separators=(",", ":"))]
        argv += ["-device", json.dumps(device(od.spec), separators=(",", ":"))]
    for i, nic in enumerate(nics):
        q = len(nic.fds)
        if q == 1:
            netdev = f"tap,id=net{i},fd={nic.fds[0]},vhost=off"
        else:
            netdev = f"tap,id=net{i},fds={':'.join(map(str, nic.fds))},vhost=off"
        if not nic.vnet_hdr:
            netdev += ",vnet_hdr=off"
        dev = f"virtio-net-pci,netdev=net{i},mac={nic.mac},id=nic{i}"
        if nic.pci_slot is not None:
            dev += f",addr={nic.pci_slot:#x}"
        if q > 1:
            dev += f",mq=on,vectors={2 * q + 2}"
        argv += ["-netdev", netdev, "-device", dev]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv
