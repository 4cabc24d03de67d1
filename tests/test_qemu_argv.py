"""The QEMU argv carries the tap fds, both monitors and -S; user data stays in argv."""

from pathlib import Path

from supervisor import load_config, parse_spec
from supervisor._qemu import NicFds, build_argv
from supervisor._records import Layout


def test_argv_shape(tmp_path):
    cfg = load_config(None, state_dir=str(tmp_path / "s"), run_dir=str(tmp_path / "r"), accel="tcg")
    lay = Layout(cfg.state_dir, cfg.run_dir)
    spec = parse_spec({"name": "vm1", "memory": 96, "kernel": "/k", "append": "console=ttyS0 $(x); y",
                       "nics": [{"mode": "routed", "ip": "10.0.0.1"}]})
    argv = build_argv(spec, cfg, lay, [NicFds("52:54:00:00:00:01", (7,), True),
                                       NicFds("52:54:00:00:00:02", (8, 9), False)], run_as="nobody")
    s = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64" and "-S" in argv
    assert "tap,id=net0,fd=7,vhost=off" in argv
    assert "tap,id=net1,fds=8:9,vhost=off,vnet_hdr=off" in argv
    assert "virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02,id=nic1,mq=on,vectors=6" in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 $(x); y"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert f"path={lay.qmp_path('vm1')}" in s and f"path={lay.operator_qmp_path('vm1')}" in s
    assert argv[-2:] == ["-runas", "nobody"]
    assert Path(lay.qmp_path("vm1")).is_relative_to(tmp_path / "r")
