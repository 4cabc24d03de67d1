"""The QEMU argv: tap fds, the host fds qsup opened, -S, the sandbox; user data stays in argv."""

from supervisor import load_config, parse_spec
from supervisor._qemu import SANDBOX, HostFds, NicFds, build_argv
from supervisor._records import Layout


def _argv(tmp_path, **spec):
    cfg = load_config(None, state_dir=str(tmp_path / "s"), run_dir=str(tmp_path / "r"), accel="tcg")
    lay = Layout(cfg.state_dir, cfg.run_dir)
    spec = parse_spec({"name": "vm1", "memory": 96, "nics": [{"mode": "routed", "ip": "10.0.0.1"}], **spec})
    return build_argv(spec, cfg, lay, [NicFds("52:54:00:00:00:01", (7,), True),
                                       NicFds("52:54:00:00:00:02", (8, 9), False)],
                      host=HostFds(qmp=10, operator_qmp=11, console=12, kernel=13, initrd=14))


def test_argv_shape(tmp_path):
    argv = _argv(tmp_path, kernel="/k", initrd="/i", append="console=ttyS0 $(x); y")
    assert argv[0] == "qemu-system-x86_64" and "-S" in argv
    assert "tap,id=net0,fd=7,vhost=off" in argv
    assert "tap,id=net1,fds=8:9,vhost=off,vnet_hdr=off" in argv
    assert "virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02,id=nic1,mq=on,vectors=6" in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 $(x); y"
    assert argv[argv.index("-accel") + 1] == "tcg"
    # everything from the host comes as an fd: QEMU (its own uid) needs no path
    assert "socket,id=qsup-qmp,fd=10,server=on,wait=off" in argv
    assert "socket,id=op-qmp,fd=11,server=on,wait=off" in argv
    assert "socket,id=console,fd=12,server=on,wait=off" in argv
    assert argv[argv.index("-kernel") + 1] == "/proc/self/fd/13"
    assert argv[argv.index("-initrd") + 1] == "/proc/self/fd/14"
    assert argv[argv.index("-sandbox") + 1] == SANDBOX and "-runas" not in argv
    # pvpanic at its fixed slot 2 (where QEMU put it before slots were fixed)
    assert "pvpanic-pci,addr=0x2" in argv and argv[argv.index("-action") + 1] == "panic=pause"
    # no machine recorded yet: the "pc" alias (pinned from QMP at the first start)
    assert argv[argv.index("-machine") + 1] == "pc"
    # no disk: no fdset, no block node, no -drive
    assert not {"-add-fd", "-blockdev", "-drive"} & set(argv)


def test_recorded_machine_and_nic_slots_are_used(tmp_path):
    cfg = load_config(None, state_dir=str(tmp_path / "s"), run_dir=str(tmp_path / "r"), accel="tcg")
    spec = parse_spec({"name": "vm1", "memory": 96, "kernel": "/k", "machine": "pc-i440fx-7.2",
                       "nics": [{"mode": "routed", "ip": "10.0.0.1"}, {"mode": "routed", "ip": "10.0.0.2"}]})
    spec = spec.with_layout()
    argv = build_argv(spec, cfg, Layout(cfg.state_dir, cfg.run_dir),
                      [NicFds("52:54:00:00:00:01", (7,), True, spec.nics[0].pci_slot),
                       NicFds("52:54:00:00:00:02", (8,), True, spec.nics[1].pci_slot)],
                      host=HostFds(qmp=10, operator_qmp=11, console=12, kernel=13))
    assert argv[argv.index("-machine") + 1] == "pc-i440fx-7.2"
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,id=nic0,addr=0x3" in argv
    assert "virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02,id=nic1,addr=0x4" in argv
