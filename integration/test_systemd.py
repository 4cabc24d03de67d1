"""The systemd unit as shipped: `make install` puts qsup where ExecStart says, the unit verifies,
and its hardening keeps `systemd-analyze security` at an exposure of 6.5 or less.

`make install` runs for real (a venv with the pinned dependencies, the unit with its ExecStart,
the bash completion), into a temporary prefix so the test never touches the host's /opt/qsup;
the default prefix is checked to match contrib/qsup.service's ExecStart separately.  There is no
running systemd on these machines: `systemd-analyze` works offline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "qsup.service"
MAX_EXPOSURE = 6.5


@pytest.fixture(scope="module")
def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze missing: `make deps` installs the systemd package"
    return exe


def _exec_start(unit: Path) -> str:
    (line,) = [l for l in unit.read_text().splitlines() if l.startswith("ExecStart=")]
    return line.split("=", 1)[1].split()[0]


def test_default_install_prefix_matches_the_units_exec_start():
    r = subprocess.run(["make", "-s", "-n", "install"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert f"ln -sfn {_exec_start(UNIT)} /usr/local/bin/qsup" in r.stdout, r.stdout
    assert _exec_start(UNIT) == "/opt/qsup/bin/qsup"


def test_make_install_then_verify(tmp_path, analyze):
    dirs = {"PREFIX": tmp_path / "opt" / "qsup", "BINDIR": tmp_path / "bin", "UNITDIR": tmp_path / "units",
            "COMPLETIONDIR": tmp_path / "completions", "CONFDIR": tmp_path / "etc"}
    r = subprocess.run(["make", "-s", "install", *(f"{k}={v}" for k, v in dirs.items())], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    unit = dirs["UNITDIR"] / "qsup.service"
    exe = Path(_exec_start(unit))
    assert exe == dirs["PREFIX"] / "bin" / "qsup"
    assert (dirs["BINDIR"] / "qsup").resolve() == exe.resolve()
    # the installed qsup runs from its own venv (not the source tree) and knows its version
    r = subprocess.run([str(dirs["BINDIR"] / "qsup"), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("qsup "), r.stderr
    r = subprocess.run([str(dirs["PREFIX"] / "bin" / "python"), "-c", "import supervisor; print(supervisor.__file__)"],
                       capture_output=True, text=True, cwd=tmp_path, check=True)
    assert r.stdout.startswith(str(dirs["PREFIX"])), r.stdout
    assert "_QSUP_COMPLETE=bash_complete" in (dirs["COMPLETIONDIR"] / "qsup").read_text()
    # dependencies as pinned in constraints.txt
    pins = dict(l.split("==") for l in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in l and not l.startswith("#"))
    frozen = subprocess.run([str(dirs["PREFIX"] / "bin" / "pip"), "freeze"], capture_output=True, text=True).stdout
    for line in frozen.splitlines():
        if "==" in line and not line.lower().startswith("qsup"):
            name, ver = line.split("==")
            assert pins.get(name) == ver, f"{name} {ver} installed, constraints.txt pins {pins.get(name)}"

    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    # the shipped unit differs from the installed one only in the prefix
    assert unit.read_text() == UNIT.read_text().replace("/opt/qsup/bin/qsup", str(exe))

    # and verify does catch a broken unit: ExecStart where nothing is installed
    broken = tmp_path / "qsup.service"
    broken.write_text(unit.read_text().replace(str(exe), str(tmp_path / "nothing" / "qsup")))
    r = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True)
    assert r.returncode != 0 and "not executable" in r.stderr

    r = subprocess.run(["make", "-s", "uninstall", *(f"{k}={v}" for k, v in dirs.items())], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not dirs["PREFIX"].exists() and not (dirs["BINDIR"] / "qsup").exists() and not unit.exists()


def _exposure(analyze: str, unit: Path) -> float:
    r = subprocess.run([analyze, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit)],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for qsup\.service: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    score = float(m.group(1))
    assert (r.returncode == 0) == (score <= MAX_EXPOSURE), (score, r.returncode)
    return score


def test_security_exposure(analyze, tmp_path):
    score = _exposure(analyze, UNIT)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}"
    # the measure is real: the same unit without its hardening is far above the bar
    bare = tmp_path / "qsup.service"
    keep = ("[", "Description", "After", "Wants", "Type", "NotifyAccess", "ExecStart", "KillMode", "WantedBy")
    bare.write_text("\n".join(l for l in UNIT.read_text().splitlines() if l.startswith(keep)) + "\n")
    assert _exposure(analyze, bare) > 9


def test_unit_keeps_what_qemu_needs():
    """Each restriction QEMU would trip over is absent, and the devices it opens are allowed."""
    text = UNIT.read_text()
    settings = [l for l in text.splitlines() if l and not l.startswith("#")]
    assert not any(l.startswith(("MemoryDenyWriteExecute=yes", "PrivateDevices=yes", "ProtectKernelTunables=yes",
                                 "PrivateNetwork=yes", "ProcSubset=pid")) for l in settings)
    for dev in ("/dev/kvm", "/dev/net/tun"):
        assert f"DeviceAllow={dev} rw" in settings
    caps = next(l for l in settings if l.startswith("CapabilityBoundingSet=")).split("=", 1)[1].split()
    assert {"CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"} <= set(caps)
    assert "KillMode=process" in settings and "Type=notify" in settings
    # each omission is explained where it would be
    for why in ("MemoryDenyWriteExecute", "SystemCallFilter", "ProtectKernelTunables", "PrivateDevices"):
        assert re.search(rf"^#.*{why}", text, re.M), why
