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
        (spec(kernel=None, disk=None), "kernel: exactly one of kernel or disk"),
        (spec(kernel="relative/path"), "kernel: 'relative/path' must be an absolute path"),
        (spec(disk="/x.img"), "kernel: exactly one of kernel or disk"),
        (spec(nics=[{"mode": "routed", "ip": "10.0.0.1", "mac": "zz:zz"}]), "nics[0].mac: invalid MAC"),
        (spec(nics=[{"mode": "routed", "ip": "10.0.0.1", "mac": "01:00:00:00:00:01"}]), "nics[0].mac: MAC address '01:00:00:00:00:01' is multicast"),
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
