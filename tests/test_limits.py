"""Node-level input checks run before anything is opened: unique routed IPs, image paths."""

from __future__ import annotations

import os

import pytest

from supervisor import SpecError, parse_spec
from supervisor._limits import check_images, check_unique_addresses


def spec(name="vm1", nics=(), **kw):
    d = {"name": name, "memory": 128, "kernel": "/boot/vmlinuz", "nics": list(nics)}
    d.update(kw)
    return parse_spec(d)


def routed(ip=None, ip6=None, link=None):
    n = {"mode": "routed"}
    n.update({k: v for k, v in (("ip", ip), ("ip6", ip6), ("link", link)) if v is not None})
    return n


def refused(fn, *a) -> SpecError:
    with pytest.raises(SpecError) as e:
        fn(*a)
    return e.value


# --- unique routed addresses ---------------------------------------------------------------


def test_distinct_addresses_pass():
    a = spec("a", [routed("10.0.0.1", "2001:db8::1")])
    b = spec("b", [routed("10.0.0.2", "2001:db8::2")])
    check_unique_addresses(a, [b])
    check_unique_addresses(a, [])


def test_ip_taken_by_another_instance_names_the_field():
    other = spec("other", [routed("10.0.0.9"), routed("10.0.0.1")])
    new = spec("new", [routed("10.0.0.5"), routed("10.0.0.1")])
    e = refused(check_unique_addresses, new, [other])
    assert e.field == "nics[1].ip" and "10.0.0.1" in str(e) and "other" in str(e), e


def test_ip6_taken_compares_addresses_not_strings():
    other = spec("other", [routed(ip6="2001:db8:0:0::10")])
    new = spec("new", [routed(ip6="2001:DB8::10/128")])
    e = refused(check_unique_addresses, new, [other])
    assert e.field == "nics[0].ip6", e


def test_same_address_twice_in_one_spec():
    e = refused(check_unique_addresses, spec("a", [routed("10.0.0.1"), routed("10.0.0.1")]), [])
    assert e.field == "nics[1].ip" and "nics[0]" in str(e), e


def test_same_address_in_another_routing_table_is_no_conflict():
    a = spec("a", [routed("10.0.0.1", link="100")])
    b = spec("b", [routed("10.0.0.1", link="200")])
    check_unique_addresses(a, [b])
    main = spec("c", [routed("10.0.0.1")])
    main254 = spec("d", [routed("10.0.0.1", link="254")])
    assert refused(check_unique_addresses, main, [main254]).field == "nics[0].ip"


def test_routing_tables_are_compared_as_tables_not_strings():
    """ "0254", "00254", "main" and no link are all table 254: one route, one owner (issue 16)."""
    owner = spec("owner", [routed("10.0.0.1")])
    for link in ("0254", "00254", "main", "254"):
        e = refused(check_unique_addresses, spec("new", [routed("10.0.0.1", link=link)]), [owner])
        assert e.field == "nics[0].ip" and "owner" in str(e), (link, e)
    e = refused(check_unique_addresses, spec("two", [routed("10.0.0.7", link="100"),
                                                     routed("10.0.0.7", link="0100")]), [])
    assert e.field == "nics[1].ip", e


def test_table_names_resolve_through_rt_tables(tmp_path):
    """A name from rt_tables is its number: ``guests`` (100) and ``100`` clash."""
    from netconf._check import resolve_table

    f = tmp_path / "rt_tables"
    f.write_text("100 guests\n")
    a = spec("a", [routed("10.0.0.1", link="guests")])
    b = spec("b", [routed("10.0.0.1", link="100")])
    check_unique_addresses(a, [b])  # on the trio thread: names are not looked up
    e = refused(check_unique_addresses, a, [b], lambda t: resolve_table(t, [str(f)]))
    assert e.field == "nics[0].ip" and "table 100" in str(e), e


@pytest.mark.parametrize("link", ["0", "253", "255", "0255", "local", "default"])
def test_reserved_routing_tables_refused_naming_link(link):
    from netconf import NetconfError, Nic, check_link

    nic = Nic(instance="vm", mac="52:54:00:00:00:01", mode="routed", tap="t0", ip="10.0.0.1", link=link)
    with pytest.raises(NetconfError, match=r"^nics\[0\]\.link: "):
        check_link(nic, 0)


def test_routed_address_of_the_host_or_its_gateway_refused(monkeypatch):
    """The node's own address, or its next hop, routed to a tap would cut the host off."""
    import ipaddress

    from netconf import NetconfError, Nic, _check

    monkeypatch.setattr(_check, "host_addresses", lambda tables: (
        {ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1")},
        {ipaddress.ip_address("192.0.2.254")}))
    for key, addr, what in (("ip", "192.0.2.1", "local"), ("ip6", "2001:db8::1", "local"),
                            ("ip", "192.0.2.254", "gateway")):
        nic = Nic(instance="vm", mac="52:54:00:00:00:01", mode="routed", tap="t0", **{key: addr})
        with pytest.raises(NetconfError, match=rf"^nics\[2\]\.{key}: .*{what}"):
            _check.check_link(nic, 2)
    _check.check_link(Nic(instance="vm", mac="52:54:00:00:00:01", mode="routed", tap="t0", ip="192.0.2.9"), 0)


def test_host_addresses_sees_loopback_and_the_default_gateway():
    import ipaddress

    from netconf._check import host_addresses

    local, _gateways = host_addresses([254])
    assert ipaddress.ip_address("127.0.0.1") in local


def test_bridged_nics_do_not_count():
    a = spec("a", [routed("10.0.0.1")])
    b = spec("b", [{"mode": "bridged", "link": "br0", "ip": "10.0.0.1"}])
    check_unique_addresses(a, [b])
    check_unique_addresses(b, [a])


# --- images --------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    (d / "vmlinuz").write_bytes(b"k")
    (d / "initrd").write_bytes(b"i")
    (d / "disk.img").write_bytes(b"d")
    (tmp_path / "secret").write_bytes(b"s")
    return d


def test_any_regular_file_when_image_dirs_is_root(images, tmp_path):
    s = spec(kernel=str(images / "vmlinuz"), initrd=str(tmp_path / "secret"))
    check_images(s, ["/"])


def test_inside_image_dirs(images, tmp_path):
    s = spec(kernel=str(images / "vmlinuz"), initrd=str(images / "initrd"))
    assert check_images(s, [tmp_path / "elsewhere", images]) == {
        "kernel": str(images / "vmlinuz"), "initrd": str(images / "initrd")}


@pytest.mark.parametrize("field", ["kernel", "initrd"])
def test_outside_image_dirs_refused(images, tmp_path, field):
    paths = {"kernel": str(images / "vmlinuz"), "initrd": str(images / "initrd")}
    paths[field] = str(tmp_path / "secret")
    e = refused(check_images, spec(**paths), [images])
    assert e.field == field and "image_dirs" in str(e), e


def test_dotdot_may_not_leave_and_symlinks_are_not_followed(images, tmp_path):
    e = refused(check_images, spec(kernel=str(images / ".." / "secret")), [images])
    assert e.field == "kernel", e
    os.symlink(tmp_path / "secret", images / "link")
    e = refused(check_images, spec(kernel=str(images / "link")), [images])
    assert e.field == "kernel" and "symbolic link" in str(e), e
    # a symlinked image dir is the operator's (followed); a link inside it, even to inside, is not
    os.symlink(images, tmp_path / "imglink")
    os.symlink(images / "vmlinuz", images / "good")
    assert refused(check_images, spec(kernel=str(images / "good")), [tmp_path / "imglink"]).field == "kernel"
    assert check_images(spec(kernel=str(tmp_path / "imglink" / "vmlinuz")), [tmp_path / "imglink"]) == {
        "kernel": str(images / "vmlinuz")}


def test_missing_file_refused(images):
    e = refused(check_images, spec(kernel=str(images / "nope")), ["/"])
    assert e.field == "kernel" and "does not exist" in str(e), e
    e = refused(check_images, spec(kernel=str(images / "nope")), [images])
    assert e.field == "kernel", e


def test_directory_and_fifo_refused(images):
    e = refused(check_images, spec(kernel=str(images)), ["/"])
    assert e.field == "kernel" and "regular file" in str(e), e
    os.mkfifo(images / "fifo")
    e = refused(check_images, spec(kernel=str(images / "fifo")), ["/"])
    assert e.field == "kernel", e


def test_devices_and_disks(images):
    # a kernel or initrd is never a device, allow_device_disks or not
    e = refused(check_images, spec(kernel="/dev/null"), ["/"])
    assert e.field == "kernel" and "device" in str(e), e
    # disks are not check_images' (supervisor._disks.check_disks opens them with their chains:
    # device disks, allow_device_disks and symlinked disks are in tests/test_disks.py)
    s = spec(kernel=None, disks=[{"id": "d0", "path": "/dev/null", "format": "raw"}])
    assert check_images(s, [images]) == {}


# --- the config keys -------------------------------------------------------------------------


def test_config_keys_defaults_and_refusals():
    from supervisor._config import load_config

    c = load_config(None)
    assert (c.qemu_uids, c.image_dirs, c.allow_device_disks) == (
        "60000-60999", [__import__("pathlib").Path("/var/lib/qsup/images")], False)
    assert c.console_max_bytes == 1024 * 1024
    assert load_config(None, image_dirs=["/srv/images"]).image_dirs == [__import__("pathlib").Path("/srv/images")]
    for kw, field in [({"qemu_uids": "0-10"}, "qemu_uids"), ({"qemu_uids": "1-2\n"}, "qemu_uids"),
                      ({"image_dirs": ["relative"]}, "image_dirs"),
                      ({"image_dirs": ["/srv/\nx"]}, "image_dirs"),
                      ({"console_max_bytes": 10}, "console_max_bytes"),
                      ({"accel": "tcg\n"}, "accel")]:
        with pytest.raises(SpecError) as e:
            load_config(None, **kw)
        assert e.value.field.startswith(field), (kw, e.value)


# --- names qsup uses itself ------------------------------------------------------------------


@pytest.mark.usefixtures("no_fakes_left")
@pytest.mark.parametrize("name", ["tls", "qsup.sock"])
def test_a_name_never_takes_qsups_own_run_dir_entries(tmp_path, name):
    """<run_dir>/tls (the QEMU TLS creds root) and the API socket are qsup's: an instance named
    like them would chmod the one and its teardown delete it (issue 16)."""
    import trio

    from core_harness import Bench
    from core_harness import spec as fake_spec

    run = tmp_path / "a" / "run"
    a = Bench(tmp_path, "a", socket=str(run / "qsup.sock"))

    async def main():
        async with a.running():
            (run / "tls").mkdir(mode=0o711)
            (run / "tls" / "other.server").mkdir()
            with pytest.raises(SpecError) as e:
                await a.node.start(fake_spec(tmp_path, name))
            assert e.value.field == "name" and "reserved" in str(e.value), e.value
            assert (run / "tls" / "other.server").is_dir() and (run / "tls").stat().st_mode & 0o777 == 0o711
            assert a.types() == [] and a.state_left() == []
            inst = await a.node.start(fake_spec(tmp_path, "tlsx"))  # a name merely like it is fine
            await inst.stop(force=True)

    trio.run(main)
