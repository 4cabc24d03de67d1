"""Open tap devices for QEMU: the supervisor owns the fd, QEMU inherits it.

Opening the tap ourselves (instead of letting QEMU run an ifup script) means
the supervisor always knows which tap belongs to which NIC, and the tap is
*non-persistent*: the kernel deletes it when the last fd closes, i.e. when
QEMU exits.  The flow is::

    h = open_tap(tap_name_for(instance, mac), queues=2)
    # spawn qemu with pass_fds=h.fds and "-netdev tap,fds=%d:%d,vhost=off"
    h.close()          # drop our copies; qemu now holds the only ones

``IFF_VNET_HDR`` is requested whenever the kernel offers it (TUNGETFEATURES),
because it lets virtio-net pass checksum/GSO metadata instead of forcing
the host to checksum every frame.  With ``queues > 1`` we use
``IFF_MULTI_QUEUE`` and open one fd per queue on the same name.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import struct

TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
#: TUNSETIFF fails with EBUSY when a device of that name exists already: qsup only ever opens a
#: tap it creates, never one somebody else made (a persistent tap, another instance's queues)
IFF_TUN_EXCL = 0x8000
IFNAMSIZ = 16


@dataclasses.dataclass
class TapHandle:
    """The fds of one open tap.  Closing every fd (ours and qemu's) deletes it."""

    name: str
    fds: list[int]
    vnet_hdr: bool

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())

    def __enter__(self) -> "TapHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _features(fd: int) -> int:
    buf = fcntl.ioctl(fd, TUNGETFEATURES, b"\0" * 4)
    features: int = struct.unpack("I", buf)[0]
    return features


SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1


def set_tap_mac(name: str, mac: str) -> None:
    """Give a (down, just created) tap its MAC before anything uses it.

    qsup sets the tap's MAC to the guest MAC with ``fe:`` as the first
    octet (see ``_plan.fe_mac``), on every node.  That matters for live
    migration: the guest's neighbour entry for its gateway (169.254.0.1,
    fe80::1) points at the tap's MAC, and after a migration it must still
    be right on the new node, or the guest keeps sending to a MAC nobody
    has until its ARP entry times out.
    """
    import socket

    hw = bytes(int(x, 16) for x in mac.split(":"))
    ifr = struct.pack("16sH6s8x", name.encode(), ARPHRD_ETHER, hw)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCSIFHWADDR, ifr)


def open_tap(name: str, queues: int = 1, mac: str | None = None) -> TapHandle:
    """Create tap ``name`` and return one fd per queue.

    The first fd creates it with ``IFF_TUN_EXCL``: a device of that name that exists already
    (a persistent tap, another instance's) is refused with EBUSY, never attached to.  The
    further queues of a multiqueue tap attach to the one just created.

    Raises ``ValueError`` for a bad name/queue count and ``OSError`` from the
    kernel (EBUSY when a device of that name exists).
    """
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid interface name {name!r}")
    if queues < 1:
        raise ValueError("queues must be >= 1")
    fds: list[int] = []
    try:
        first = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fds.append(first)
        feats = _features(first)
        flags = IFF_TAP | IFF_NO_PI
        vnet = bool(feats & IFF_VNET_HDR)
        if vnet:
            flags |= IFF_VNET_HDR
        if queues > 1:
            if not feats & IFF_MULTI_QUEUE:
                raise OSError(95, "tap: kernel lacks IFF_MULTI_QUEUE")
            flags |= IFF_MULTI_QUEUE
        fcntl.ioctl(first, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags | IFF_TUN_EXCL))
        ifr = struct.pack("16sH22x", name.encode(), flags)
        for _ in range(queues - 1):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        if mac:
            set_tap_mac(name, mac)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return TapHandle(name=name, fds=fds, vnet_hdr=vnet)


def tap_name_for(instance: str, mac: str) -> str:
    """A stable 15-char-max tap name: ``qs`` + 13 hex chars of sha256(instance|mac).

    Stable so that a restarted daemon (and the journal) find the same name;
    hashed because instance names are up to 63 chars and IFNAMSIZ is 16.
    """
    digest = hashlib.sha256(f"{instance}|{mac.lower()}".encode()).hexdigest()
    return "qs" + digest[:13]


# -- a tap's offload state: QEMU sets it on the device (shared by every fd of the tap) --------
TUNSETOFFLOAD = 0x400454D0
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
TUN_F_USO4, TUN_F_USO6 = 0x20, 0x40
#: the ethtool feature the kernel turns on for each TUNSETOFFLOAD flag (drivers/net/tun.c set_offload)
_OFFLOAD_FEATURES = {
    TUN_F_CSUM: "tx-checksum-ip-generic", TUN_F_TSO4: "tx-tcp-segmentation",
    TUN_F_TSO6: "tx-tcp6-segmentation", TUN_F_TSO_ECN: "tx-tcp-ecn-segmentation",
    TUN_F_USO4 | TUN_F_USO6: "tx-udp-segmentation",
}


@dataclasses.dataclass(frozen=True)
class TapOffloads:
    """What a QEMU's virtio-net set on its tap: the vnet header size and the offload flags.

    A second QEMU given the same tap (an upgrade in place) sets its own at start; if that QEMU
    goes away before it took over the guest, the first one's must be put back, or the guest's
    frames are framed with the wrong header size and its network is dead."""

    vnet_hdr_size: int
    flags: int

    def to_dict(self) -> dict[str, int]:
        return {"vnet_hdr_size": self.vnet_hdr_size, "flags": self.flags}


def tap_offloads(fd: int, name: str) -> TapOffloads:
    """Read them: TUNGETVNETHDRSZ on ``fd``, the offloads from the device's ethtool features."""
    from pyroute2.ethtool import Ethtool

    (size,) = struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, b"\0" * 4))
    eth = Ethtool()
    try:
        on = {k for k, v in eth.get_features(name).features.items() if v.enable}
    finally:
        eth.close()
    flags = 0
    for flag, feature in _OFFLOAD_FEATURES.items():
        if feature in on:
            flags |= flag
    if not flags & TUN_F_CSUM:
        flags = 0  # the kernel allows no segmentation offload without checksum offload
    return TapOffloads(size, flags)


def set_tap_offloads(fd: int, off: TapOffloads) -> None:
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", off.vnet_hdr_size))
    fcntl.ioctl(fd, TUNSETOFFLOAD, off.flags)
