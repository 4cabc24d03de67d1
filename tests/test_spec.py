"""Spec validation: unknown fields refused, every error names its field."""

import json

import pytest

from supervisor import SpecError, load_spec_file, parse_spec

BASE = {"name": "vm1", "memory": 128, "kernel": "/boot/vmlinuz"}


def spec(**kw):
    d = dict(BASE)
    d.update(kw)
    return d


def err(d) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    return str(e.value)


def test_minimal_spec_is_valid():
    s = parse_spec(spec())
    assert s.name == "vm1" and s.vcpus == 1 and s.nics == []


@pytest.mark.parametrize(
    "d, field",
    [
        (spec(bogus=1), "bogus: unknown field"),
        (spec(name="../x"), "name: invalid name"),
        (spec(name=".."), "name: invalid name"),
        (spec(name="a/b"), "name: invalid name"),
        (spec(name="x" * 64), "name:"),
        (spec(memory="128"), "memory:"),
        (spec(memory=1), "memory:"),
        (spec(kernel=None, disk=None), "kernel: a kernel or at least one disk is required"),
        (spec(kernel=None, disks=[]), "kernel: a kernel or at least one disk is required"),
        (spec(kernel="relative/path"), "kernel: 'relative/path' must be an absolute path"),
        (spec(kernel=None, disk="/x.img", append="quiet"), "kernel: initrd and append need kernel"),
        (spec(disk="/x.img", disks=[]), "disk: give disks, not disk"),
        (spec(nics=[{"mode": "routed", "ip": "10.0.0.1", "mac": "zz:zz"}]), "nics[0].mac: invalid MAC"),
        (spec(nics=[{"mode": "routed", "ip": "10.0.0.1", "mac": "01:00:00:00:00:01"}]),
         "nics[0].mac: MAC address '01:00:00:00:00:01' is multicast"),
        (spec(nics=[{"mode": "routed", "ip": "10.0.0.300"}]), "nics[0].ip: invalid IPv4 address"),
        (spec(nics=[{"mode": "routed", "ip": "10.0.0.0/24"}]), "nics[0].ip:"),
        (spec(nics=[{"mode": "routed", "ip6": "10.0.0.1"}]), "nics[0].ip6: invalid IPv6"),
        (spec(nics=[{"mode": "routed"}]), "nics[0].ip: routed mode needs ip or ip6"),
        (spec(nics=[{"mode": "bridged"}]), "nics[0].link: required for mode 'bridged'"),
        (spec(nics=[{"mode": "openvswitch"}]), "nics[0].link: required"),
        (spec(nics=[{"mode": "tunnel", "link": "x"}]), "nics[0].mode:"),
        (spec(nics=[{"mode": "bridged", "link": "br0", "vlan": 4095}]), "nics[0].vlan: VLAN 4095 out of range"),
        (spec(nics=[{"mode": "bridged", "link": "br0", "vlan": 0}]), "nics[0].vlan:"),
        (spec(nics=[{"mode": "bridged", "link": "br0", "vlan": [5, 5]}]), "nics[0].vlan:"),
        (spec(nics=[{"mode": "bridged", "link": "br0", "queues": 0}]), "nics[0].queues:"),
        (spec(nics=[{"mode": "bridged", "link": "br 0"}]), "nics[0].link:"),
        (spec(nics=[{"mode": "bridged", "link": "br0", "colour": "red"}]), "nics[0].colour: unknown field"),
        (spec(nics=[{"mode": "routed", "ip": "10.0.0.1", "mac": "52:54:00:00:00:01"},
                    {"mode": "routed", "ip": "10.0.0.2", "mac": "52:54:00:00:00:01"}]), "nics[1].mac: duplicate MAC"),
        (spec(tags="x"), "tags:"),
        (spec(accel="kvm;rm"), "accel:"),
    ],
)
def test_bad_specs_name_the_field(d, field):
    assert err(d).startswith(field), err(d)


def test_tags_are_kept_literally():
    tags = ["$(touch /tmp/pwned)", "a;b", "it's \"quoted\"", "sp ace"]
    assert parse_spec(spec(tags=tags)).tags == tags


def test_generated_macs_are_stable_and_local():
    d = spec(nics=[{"mode": "routed", "ip": "10.0.0.1"}, {"mode": "routed", "ip": "10.0.0.2"}])
    a = [n.mac for n in parse_spec(d).resolved_nics()]
    b = [n.mac for n in parse_spec(d).resolved_nics()]
    assert a == b and a[0] != a[1] and all(m.startswith("52:54:00:") for m in a)


def test_ip_with_host_prefix_is_accepted():
    s = parse_spec(spec(nics=[{"mode": "routed", "ip": "10.0.0.1/32", "ip6": "2001:db8::5/128"}]))
    assert (s.nics[0].ip, s.nics[0].ip6) == ("10.0.0.1", "2001:db8::5")


def test_load_json_and_toml(tmp_path):
    j = tmp_path / "a.json"
    j.write_text(json.dumps(spec()))
    t = tmp_path / "a.toml"
    t.write_text('name = "vm2"\nmemory = 64\nkernel = "/k"\n[[nics]]\nmode = "routed"\nip = "10.1.1.1"\n')
    assert load_spec_file(j).name == "vm1"
    assert load_spec_file(t).nics[0].ip == "10.1.1.1"
    bad = tmp_path / "b.toml"
    bad.write_text("name = ")
    with pytest.raises(SpecError, match="not valid JSON/TOML"):
        load_spec_file(bad)


# --- issue 9: every string field is checked on the full string ---------------------------

NIC = {"mode": "routed", "ip": "10.0.0.1"}


@pytest.mark.parametrize("bad", ["\n", "\r\n", "\x00", "\ud800", "\udfff", "\x1b", "\x7f", "\x85"])
@pytest.mark.parametrize(
    "make, field",
    [
        (lambda s: spec(name="vm1" + s), "name:"),
        (lambda s: spec(accel="tcg" + s), "accel:"),
        (lambda s: spec(append="console=ttyS0" + s), "append:"),
        (lambda s: spec(tags=["ok", "web" + s]), "tags[1]:"),
        (lambda s: spec(kernel="/boot/vmlinuz" + s), "kernel:"),
        (lambda s: spec(initrd="/boot/initrd" + s), "initrd:"),
        # the old single disk is read as disks[0]: its error names where the path now is
        (lambda s: spec(kernel=None, disk="/srv/d.img" + s), "disks[0].path:"),
        (lambda s: spec(disks=[{"id": "d0", "path": "/srv/d.img" + s, "format": "raw"}]), "disks[0].path:"),
        (lambda s: spec(disks=[{"id": "d0", "path": "/srv/d.img", "format": "raw", "serial": "S1" + s}]),
         "disks[0].serial:"),
        (lambda s: spec(disks=[{"id": "d0" + s, "path": "/srv/d.img", "format": "raw"}]), "disks[0].id:"),
        (lambda s: spec(machine="pc-i440fx-7.2" + s), "machine:"),
        (lambda s: spec(nics=[dict(NIC, mac="52:54:00:00:00:01" + s)]), "nics[0].mac:"),
        (lambda s: spec(nics=[dict(NIC, link="100" + s)]), "nics[0].link:"),
        (lambda s: spec(nics=[{"mode": "bridged", "link": "br0" + s}]), "nics[0].link:"),
        (lambda s: spec(nics=[dict(NIC, ip="10.0.0.1" + s)]), "nics[0].ip:"),
        (lambda s: spec(nics=[{"mode": "routed", "ip6": "2001:db8::1" + s}]), "nics[0].ip6:"),
    ],
)
def test_trailing_newline_nul_surrogate_and_controls_refused(make, field, bad):
    """`re.match` with `$` accepts "x\\n"; NUL and lone surrogates broke the event stream."""
    assert err(make(bad)).startswith(field), err(make(bad))


@pytest.mark.parametrize("bad", ["\x00", "\ud800", "\n"])
def test_bad_characters_inside_a_string_refused(bad):
    assert err(spec(name="vm" + bad + "1")).startswith("name:")
    assert err(spec(tags=["a" + bad + "b"])).startswith("tags[0]:")
    assert err(spec(append="a" + bad + "b")).startswith("append:")


def test_refusals_are_one_line_and_encodable():
    """The error itself must be printable and valid UTF-8 (it goes to stderr and events)."""
    for d in (spec(name="vm1\n"), spec(tags=["\ud800"]), spec(append="\x00")):
        e = err(d)
        assert "\n" not in e
        e.encode("utf-8")


def test_unicode_tags_and_append_still_accepted():
    s = parse_spec(spec(tags=["équipe", "日本", "a b"], append="console=ttyS0 quiet x=ü"))
    assert s.tags == ["équipe", "日本", "a b"]


@pytest.mark.parametrize(
    "ip, field",
    [
        ("255.255.255.255", "nics[0].ip:"),
        ("169.254.0.1", "nics[0].ip:"),    # the guests' own gateway (netconf GATEWAY4)
        ("169.254.3.4", "nics[0].ip:"),    # link-local
        ("0.0.0.0", "nics[0].ip:"),
        ("0.1.2.3", "nics[0].ip:"),        # "this network"
        ("127.0.0.1", "nics[0].ip:"),
        ("224.0.0.1", "nics[0].ip:"),
        ("240.0.0.1", "nics[0].ip:"),      # reserved (class E)
    ],
)
def test_special_ipv4_refused(ip, field):
    assert err(spec(nics=[{"mode": "routed", "ip": ip}])).startswith(field)


@pytest.mark.parametrize(
    "ip6", ["fe80::1", "fe80::5", "::", "::1", "ff02::1", "ff0e::1", "::ffff:10.0.0.1",
            "2001:db8::1%eth0"],
)
def test_special_ipv6_refused(ip6):
    assert err(spec(nics=[{"mode": "routed", "ip6": ip6}])).startswith("nics[0].ip6:")


def test_gateways_are_netconfs():
    from netconf._plan import GATEWAY4, GATEWAY6
    assert err(spec(nics=[{"mode": "routed", "ip": GATEWAY4}])).startswith("nics[0].ip:")
    assert err(spec(nics=[{"mode": "routed", "ip6": GATEWAY6}])).startswith("nics[0].ip6:")


def test_ordinary_addresses_still_accepted():
    s = parse_spec(spec(nics=[{"mode": "routed", "ip": "192.0.2.10", "ip6": "2001:db8::10"},
                              {"mode": "routed", "ip": "100.64.0.1"}]))
    assert s.nics[1].ip == "100.64.0.1"


def test_nic_count_capped():
    from supervisor._spec import MAX_NICS
    ok = [{"mode": "routed", "ip": f"10.0.{i}.1"} for i in range(MAX_NICS)]
    assert len(parse_spec(spec(nics=ok)).nics) == MAX_NICS
    e = err(spec(nics=ok + [{"mode": "routed", "ip": "10.1.0.1"}]))
    assert e.startswith("nics:") and str(MAX_NICS) in e, e


def test_queues_per_nic_and_total_capped():
    from supervisor._spec import MAX_QUEUES, MAX_TOTAL_QUEUES
    assert err(spec(nics=[{"mode": "bridged", "link": "br0", "queues": MAX_QUEUES + 1}])).startswith("nics[0].queues:")
    per = MAX_QUEUES
    n_ok = MAX_TOTAL_QUEUES // per
    nics = [{"mode": "bridged", "link": "br0", "queues": per} for _ in range(n_ok)]
    parse_spec(spec(nics=nics))
    e = err(spec(nics=nics + [{"mode": "bridged", "link": "br0", "queues": 1}]))
    assert e.startswith(f"nics[{n_ok}].queues:") and str(MAX_TOTAL_QUEUES) in e, e
