"""Hooks are run for real: each test writes executable scripts into a tmp dir and runs them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from netconf._hooks import (
    HOOK_PATH,
    OUTPUT_CAP,
    HookError,
    HookResult,
    Hooks,
    StepHooks,
    hook_env,
)
from netconf._types import NetconfError, Nic

ROUTED = Nic(
    instance="web1", mac="52:54:00:AB:CD:EF", mode="routed", tap="qs-web1-0",
    ip="192.0.2.10", ip6="2001:db8::10", tags=("prod", "team a"),
)
BRIDGED = Nic(
    instance="db2", mac="52:54:00:00:00:02", mode="bridged", tap="qs-db2-0",
    link="br0", vlan=42, trunks=(100, 200), mtu=9000,
)

# Writes argv, the environment, cwd, stdin and its open fds (as JSON) next to itself.  qsup
# executes a hook through the fd it checked: a script's $0 is /proc/self/fd/N, whose link
# names the hook's path.
DUMP = """#!/usr/bin/python3
import json, os, sys
fds = sorted(int(x) for x in os.listdir("/proc/self/fd"))
me = os.readlink(sys.argv[0])
with open(me + ".out", "w") as f:
    json.dump({"argv": sys.argv, "me": me, "env": dict(os.environ), "cwd": os.getcwd(),
               "stdin": os.readlink("/proc/self/fd/0"), "fds": fds}, f)
"""


def write(path: Path, text: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def sh(path: Path, body: str, mode: int = 0o755) -> Path:
    return write(path, "#!/bin/sh\n" + body + "\n", mode)


# --- find ----------------------------------------------------------------------------------


def test_find_layout_order_and_ignoring(tmp_path):
    step = tmp_path / "route4"
    b = step / "before.d"
    for name in ("20-b", "10-a", "9-z", "B-upper"):
        sh(b / name, "exit 0")
    sh(b / "30-not-executable", "exit 0", mode=0o644)
    for junk in ("15-x~", ".15-hidden", "15-x.dpkg-old", "15-x.dpkg-new", "15-x.ucf-dist",
                 "15-x.rpmnew", "15-x.swp", "#15-x#", "15-x.bak"):
        sh(b / junk, "exit 0")
    (b / "40-dir").mkdir()
    os.symlink(b / "10-a", b / "50-link")  # a symlink to an executable file counts
    os.symlink(tmp_path / "nowhere", b / "60-dangling")
    sh(step / "replace", "exit 0")
    sh(step / "after.d" / "50-log", "exit 0")

    found = Hooks(tmp_path).find("route4")
    assert [p.name for p in found.before] == ["10-a", "20-b", "50-link", "9-z", "B-upper"]
    assert found.replace == step / "replace"
    assert found.after == (step / "after.d" / "50-log",)
    assert found.before[0] == b / "10-a"
    assert found  # truthy when any hook exists


def test_find_missing_dir_and_missing_step(tmp_path):
    assert Hooks(tmp_path / "does-not-exist").find("route4") == StepHooks((), None, ())
    assert not Hooks(tmp_path).find("route4")
    assert not Hooks(None).find("route4")
    assert not Hooks("").find("route4")  # empty config value disables, never means cwd
    (tmp_path / "rule4").mkdir()
    assert Hooks(tmp_path).find("rule4") == StepHooks()


def test_replace_must_be_executable_regular_file(tmp_path):
    sh(tmp_path / "route4" / "replace", "exit 0", mode=0o644)
    (tmp_path / "route6" / "replace").mkdir(parents=True)
    h = Hooks(tmp_path)
    assert h.find("route4").replace is None
    assert h.find("route6").replace is None


@pytest.mark.parametrize("bad", ["../etc", "route4/../../x", "/abs", "Route4", "", "-x",
                                 "a b", "a\0b", ".", "..", "route_4", "r\n", 4])
def test_bad_step_name_refused(tmp_path, bad):
    h = Hooks(tmp_path)
    with pytest.raises(ValueError, match="invalid hook step name"):
        h.find(bad)
    script = sh(tmp_path / "ok", "exit 0")
    with pytest.raises(ValueError, match="invalid hook step name"):
        h.run(script, {}, step=bad, action="up")


def test_find_sees_changes_without_restart(tmp_path):
    h = Hooks(tmp_path)
    assert not h.find("route4")
    hook = sh(tmp_path / "route4" / "after.d" / "50-log", "exit 0", mode=0o644)
    assert not h.find("route4")  # not executable yet
    hook.chmod(0o755)  # changes no directory mtime: must still be seen
    assert h.find("route4").after == (hook,)
    hook.unlink()
    assert not h.find("route4")
    sh(tmp_path / "gw6" / "replace", "exit 0")
    assert h.find("gw6").replace == tmp_path / "gw6" / "replace"


def test_find_cache_revalidates_old_listing(tmp_path):
    """A cached listing of an old directory must be dropped when the directory changes."""
    h = Hooks(tmp_path)
    old = time.time() - 3600
    os.utime(tmp_path, (old, old))
    assert not h.find("route4")  # listing cached (mtime is old: trusted)
    assert not h.find("route4")
    sh(tmp_path / "route4" / "replace", "exit 0")  # bumps hooks_dir mtime
    assert h.find("route4").replace is not None


def test_unknown_steps(tmp_path):
    (tmp_path / "route4").mkdir()
    (tmp_path / "rout4").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "README").write_text("notes")
    assert Hooks(tmp_path).unknown_steps() == ["rout4"]
    assert Hooks(None).unknown_steps() == []


# --- environment ---------------------------------------------------------------------------


def test_hook_env_routed():
    env = hook_env(ROUTED, ifindex=17, reason="migrate-in", action="up", bridge=None)
    assert env == {
        "INSTANCE": "web1", "MAC": "52:54:00:ab:cd:ef", "MODE": "routed",
        "INTERFACE": "qs-web1-0", "INTERFACE_INDEX": "17", "IP": "192.0.2.10",
        "IP6": "2001:db8::10", "PHASE": "migrate-in", "ACTION": "up",
        "TAGS": '["prod","team a"]', "TAG_COUNT": "2", "TAG_1": "prod", "TAG_2": "team a",
    }


def test_hook_env_bridged():
    env = hook_env(BRIDGED, ifindex=None, reason="stop", action="down", bridge="br0")
    assert env == {
        "INSTANCE": "db2", "MAC": "52:54:00:00:00:02", "MODE": "bridged",
        "INTERFACE": "qs-db2-0", "LINK": "br0", "BRIDGE": "br0", "VLAN": "42",
        "TRUNKS": "100 200", "MTU": "9000", "PHASE": "stop", "ACTION": "down",
        "TAGS": "[]", "TAG_COUNT": "0",
    }


def test_hook_env_refuses_bad_reason_or_action():
    with pytest.raises(ValueError):
        hook_env(ROUTED, ifindex=1, reason="reboot", action="up", bridge=None)
    with pytest.raises(ValueError):
        hook_env(ROUTED, ifindex=1, reason="start", action="sideways", bridge=None)


def test_run_env_argv_and_isolation(tmp_path, monkeypatch):
    monkeypatch.setenv("QSUP_SECRET_TOKEN", "hunter2")
    hook = write(tmp_path / "route4" / "after.d" / "50-dump", DUMP)
    env = hook_env(ROUTED, ifindex=17, reason="start", action="up", bridge=None)
    result = Hooks(tmp_path).run(hook, env, step="route4", action="up")
    assert isinstance(result, HookResult)
    assert (result.exit_code, result.timed_out, result.path) == (0, False, hook)
    assert result.duration_s > 0
    seen = json.loads(Path(str(hook) + ".out").read_text())
    assert seen["argv"][1:] == ["route4", "up"] and seen["me"] == str(hook)
    self_fd = int(seen["argv"][0].removeprefix("/proc/self/fd/"))  # the checked file, executed
    expected = dict(env, STEP="route4", PATH=HOOK_PATH)
    # The interpreter may add LC_CTYPE on a C locale; nothing else may appear.
    extra = {k: v for k, v in seen["env"].items() if k not in expected}
    assert set(extra) <= {"LC_CTYPE"}, extra
    assert {k: seen["env"][k] for k in expected} == expected
    assert "QSUP_SECRET_TOKEN" not in seen["env"]
    assert seen["cwd"] == "/"
    assert seen["stdin"] == "/dev/null"
    # the listdir fd itself and the hook's own (what it was executed through): nothing leaked
    assert len(seen["fds"]) == 5 and {0, 1, 2, self_fd} < set(seen["fds"]), seen["fds"]


def test_hostile_tags_reach_hook_literally(tmp_path):
    pwned = tmp_path / "pwned"
    tags = (f"$(touch {pwned})", f"`touch {pwned}`", f"a; touch {pwned}", "it's \"quoted\"",
            "two  spaces ", "*", "new\nline", "ünïcödé", "--help", "")
    nic = Nic(instance="x", mac="52:54:00:00:00:09", mode="routed", tap="t0", tags=tags)
    env = hook_env(nic, ifindex=3, reason="start", action="up", bridge=None)
    # A shell hook that uses its values the documented way (quoted) must not execute them.
    hook = sh(tmp_path / "route4" / "replace",
              'me=$(readlink "$0")\n'  # $0 is /proc/self/fd/N: the file qsup checked
              'printf "%s" "$TAGS" > "$me.tags"\n'
              'i=1; while [ "$i" -le "$TAG_COUNT" ]; do printenv "TAG_$i" >> "$me.each"; '
              'printf "\\0" >> "$me.each"; i=$((i+1)); done\n'
              'logger --no-act -- "$TAGS" "$@" 2>/dev/null || true')
    Hooks(tmp_path).run(hook, env, step="route4", action="up")
    assert json.loads(Path(str(hook) + ".tags").read_text()) == list(tags)
    each = Path(str(hook) + ".each").read_text().split("\0")[:-1]
    assert [t.removesuffix("\n") for t in each] == list(tags)  # printenv adds one newline
    dumper = write(tmp_path / "dump", DUMP)
    Hooks(tmp_path).run(dumper, env, step="route4", action="up")
    seen = json.loads(Path(str(dumper) + ".out").read_text())
    assert [seen["env"][f"TAG_{i}"] for i in range(1, len(tags) + 1)] == list(tags)
    assert not pwned.exists()


# --- failures ------------------------------------------------------------------------------


def test_nonzero_exit_raises_hook_error(tmp_path):
    hook = sh(tmp_path / "rule4" / "before.d" / "10-fail",
              'echo "to stdout"; echo "to stderr" >&2; exit 3')
    with pytest.raises(HookError) as ei:
        Hooks(tmp_path).run(hook, {}, step="rule4", action="down")
    err = ei.value
    assert isinstance(err, NetconfError)
    first, *rest = str(err).splitlines()
    assert first == f"hook {hook} for step rule4 (down) exited with code 3"
    assert rest == ["to stdout", "to stderr"]
    assert err.failures == [{
        "step": "rule4", "path": str(hook), "exit_code": 3,
        "output": "to stdout\nto stderr\n", "error": first, "timed_out": False,
    }]
    assert err.result.exit_code == 3


def test_killed_by_signal(tmp_path):
    hook = sh(tmp_path / "h", "kill -TERM $$")
    with pytest.raises(HookError, match="killed by signal SIGTERM") as ei:
        Hooks(tmp_path).run(hook, {}, step="route4", action="up")
    assert ei.value.failures[0]["exit_code"] == -15


def test_unexecutable_hook_raises_hook_error(tmp_path):
    hook = write(tmp_path / "noshebang", "echo hi\n")  # ENOEXEC: no #! line
    with pytest.raises(HookError, match="could not be executed") as ei:
        Hooks(tmp_path).run(hook, {}, step="route4", action="up")
    assert ei.value.failures[0]["exit_code"] is None
    with pytest.raises(HookError, match="refused: .*gone does not exist"):
        Hooks(tmp_path).run(tmp_path / "gone", {}, step="route4", action="up")


def _gone(pid: int) -> bool:
    """True if pid no longer runs (a zombie waiting for a non-reaping init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_timeout_kills_hook_and_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    hook = sh(tmp_path / "hang",
              f'sleep 100 &\necho $! > "{pidfile}"\necho started\nsleep 100')
    t0 = time.monotonic()
    with pytest.raises(HookError) as ei:
        Hooks(tmp_path, timeout=0.5).run(hook, {}, step="gw6", action="up")
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 3
    err = ei.value
    assert str(err).splitlines()[0] == (
        f"hook {hook} for step gw6 (up) timed out after 0.5s (process group killed)")
    assert err.failures[0]["timed_out"] is True
    assert err.failures[0]["output"] == "started\n"
    assert err.result.timed_out and err.result.exit_code == -9
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _gone(child)


def test_background_child_holding_pipe_does_not_block(tmp_path):
    """The hook exits at once; a child it leaves behind keeps stdout open.  We must not wait."""
    pidfile = tmp_path / "child.pid"
    hook = sh(tmp_path / "bg", f'sleep 3 &\necho $! > "{pidfile}"\necho done')
    t0 = time.monotonic()
    try:
        result = Hooks(tmp_path, timeout=5).run(hook, {}, step="route4", action="up")
        assert time.monotonic() - t0 < 1.5
        assert (result.exit_code, result.output) == (0, "done\n")
    finally:
        os.kill(int(pidfile.read_text()), 9)  # our own child's pid, read from the file


def test_output_is_capped_to_the_tail(tmp_path):
    hook = write(tmp_path / "loud", "#!/usr/bin/python3\nimport sys\n"
                 "sys.stdout.write('x' * 1000000)\nsys.stdout.write('THE END\\n')\n")
    result = Hooks(tmp_path).run(hook, {}, step="route4", action="up")
    assert result.output.endswith("x" * 1000 + "THE END\n")
    assert result.output.startswith("[... ")
    assert len(result.output.encode()) < OUTPUT_CAP + 100


def test_error_message_output_is_trimmed(tmp_path):
    hook = write(tmp_path / "loud", "#!/usr/bin/python3\nimport sys\n"
                 "print('y' * 100000)\nprint('last words')\nsys.exit(1)\n")
    with pytest.raises(HookError) as ei:
        Hooks(tmp_path).run(hook, {}, step="route4", action="up")
    msg = str(ei.value)
    assert len(msg) < 6000 and msg.endswith("last words")
    assert len(ei.value.failures[0]["output"]) > 60000  # the full (capped) output is kept


def test_run_refuses_contradicting_action(tmp_path):
    hook = sh(tmp_path / "ok", "exit 0")
    h = Hooks(tmp_path)
    with pytest.raises(ValueError):
        h.run(hook, {"ACTION": "down"}, step="route4", action="up")
    with pytest.raises(ValueError):
        h.run(hook, {}, step="route4", action="sideways")
    with pytest.raises(ValueError):
        h.run(hook, {"X": "a\0b"}, step="route4", action="up")


def test_bad_timeout_refused():
    with pytest.raises(ValueError):
        Hooks(None, timeout=0)


# --- the shipped examples ------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "hooks"


def test_examples_are_found_as_hooks():
    h = Hooks(EXAMPLES)
    assert [p.name for p in h.find("route4").after] == ["50-log"]
    assert h.find("bridge-port").replace == EXAMPLES / "bridge-port" / "replace"
    assert h.unknown_steps() == []


@pytest.mark.parametrize("tags, complaint", [
    (("$(touch /nonexistent)", "colour=blue"), "no bridge=... tag"),
    (("bridge=br0;touch /nonexistent",), "not a valid interface name"),
    (("bridge=../../x",), "not a valid interface name"),
    (("bridge=qsup-no-such-br",), "does not exist or is not a bridge"),
])
def test_bridge_port_example_refuses_before_touching_host(tags, complaint):
    """Run the example for real, on inputs where it must stop before changing anything."""
    nic = Nic(instance="x", mac="52:54:00:00:00:09", mode="bridged", tap="t0", tags=tags)
    env = hook_env(nic, ifindex=3, reason="start", action="up", bridge=None)
    with pytest.raises(HookError, match="exited with code 2") as ei:
        Hooks(EXAMPLES).run(EXAMPLES / "bridge-port" / "replace", env,
                            step="bridge-port", action="up")
    assert complaint in ei.value.failures[0]["output"]


NS_DRIVER = """
import json, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
examples = Path(sys.argv[2])
subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], check=True)
subprocess.run(["ip", "link", "add", "br-dmz", "type", "bridge"], check=True)
subprocess.run(["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
from netconf._hooks import Hooks, hook_env
from netconf._types import Nic
nic = Nic(instance="x", mac="52:54:00:00:00:09", mode="bridged", tap="v0", link="br0",
          tags=("colour=blue", "bridge=br-dmz", "bridge=ignored"))
hooks, replace, seen = Hooks(examples), examples / "bridge-port" / "replace", {}
for action in ("up", "down", "down"):  # the second down must be a harmless no-op
    hooks.run(replace, hook_env(nic, ifindex=None, reason="start", action=action, bridge="br0"),
              step="bridge-port", action=action)
    master = Path("/sys/class/net/v0/master")
    seen[action] = os.path.basename(os.readlink(master)) if master.exists() else None
subprocess.run(["ip", "link", "del", "v0"], check=True)
hooks.run(replace, hook_env(nic, ifindex=None, reason="crash", action="down", bridge="br0"),
          step="bridge-port", action="down")  # tap already gone: still fine
print(json.dumps(seen))
"""


def test_bridge_port_example_in_user_namespace(tmp_path):
    """The example really enslaves and releases an interface (in a throwaway user+net ns)."""
    import shutil
    import subprocess
    import sys

    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rnm", "true"]).returncode != 0:
        pytest.skip("unprivileged user+net namespaces unavailable")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([unshare, "-rnm", sys.executable, "-c", NS_DRIVER, str(root),
                           str(EXAMPLES)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"up": "br-dmz", "down": None}


def test_lone_surrogate_tag_is_passed_safely(tmp_path):
    """JSON specs may carry "\\ud800"; TAGS stays lossless, TAG_n gets U+FFFD, nothing crashes."""
    nic = Nic(instance="x", mac="52:54:00:00:00:09", mode="routed", tap="t0",
              tags=("ok", "bad\ud800tag"))
    env = hook_env(nic, ifindex=3, reason="start", action="up", bridge=None)
    assert json.loads(env["TAGS"]) == ["ok", "bad\ud800tag"]
    assert env["TAG_2"] == "bad\ufffdtag"
    hook = write(tmp_path / "dump", DUMP)
    Hooks(tmp_path).run(hook, env, step="route4", action="up")
    seen = json.loads(Path(str(hook) + ".out").read_text())
    assert json.loads(seen["env"]["TAGS"]) == ["ok", "bad\ud800tag"]
    assert seen["env"]["TAG_2"] == "bad\ufffdtag"


def test_log_example_runs_and_never_fails_the_step(tmp_path):
    pwned = tmp_path / "pwned"
    nic = Nic(instance="x", mac="52:54:00:00:00:09", mode="routed", tap="t0", ip="192.0.2.1",
              tags=(f"$(touch {pwned})", f"'; touch {pwned}; '"))
    for action in ("up", "down"):
        env = hook_env(nic, ifindex=7, reason="start", action=action, bridge=None)
        result = Hooks(EXAMPLES).run(EXAMPLES / "route4" / "after.d" / "50-log", env,
                                     step="route4", action=action)
        assert result.exit_code == 0
    assert not pwned.exists()


# --- issue 9: a hook runs only if nobody but root (the daemon's user) could have changed it ---

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
OTHER_UID = 65534


def _armed(tmp_path, hook_path: Path) -> tuple[Path, Path]:
    """A hook that leaves a marker if it runs; returns (hook, marker)."""
    marker = tmp_path / "ran"
    return sh(hook_path, f"touch {marker}"), marker


def _refused(hooks: Hooks, hook: Path, marker: Path, step: str = "route4") -> HookError:
    with pytest.raises(HookError) as ei:
        hooks.run(hook, {}, step=step, action="up")
    assert not marker.exists(), "an untrusted hook ran"
    failure = ei.value.failures[0]
    assert failure["path"] == str(hook) and failure["exit_code"] is None
    assert str(hook) in str(ei.value)
    return ei.value


def test_trusted_hook_runs(tmp_path):
    hooks = tmp_path / "hooks"
    hook, marker = _armed(tmp_path, hooks / "route4" / "replace")
    Hooks(hooks).run(hook, {}, step="route4", action="up")
    assert marker.exists()


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777, 0o4777])
def test_group_or_world_writable_hook_refused(tmp_path, mode):
    hooks = tmp_path / "hooks"
    hook, marker = _armed(tmp_path, hooks / "route4" / "replace")
    hook.chmod(mode)
    e = _refused(Hooks(hooks), hook, marker)
    assert "writable" in str(e), e


@pytest.mark.parametrize("which", ["hooks_dir", "step", "after.d"])
def test_writable_directory_above_the_hook_refused(tmp_path, which):
    hooks = tmp_path / "hooks"
    hook, marker = _armed(tmp_path, hooks / "route4" / "after.d" / "10-x")
    d = {"hooks_dir": hooks, "step": hooks / "route4", "after.d": hooks / "route4" / "after.d"}[which]
    d.chmod(0o777)
    e = _refused(Hooks(hooks), hook, marker)
    assert f"{d} " in str(e) and "writable" in str(e), e
    d.chmod(0o755)
    Hooks(hooks).run(hook, {}, step="route4", action="up")
    assert marker.exists()


@needs_root
def test_hook_owned_by_another_user_refused(tmp_path):
    hooks = tmp_path / "hooks"
    hook, marker = _armed(tmp_path, hooks / "route4" / "replace")
    os.chown(hook, OTHER_UID, -1)
    e = _refused(Hooks(hooks), hook, marker)
    assert f"uid {OTHER_UID}" in str(e), e


@needs_root
@pytest.mark.parametrize("which", ["hooks_dir", "step", "before.d"])
def test_directory_owned_by_another_user_refused(tmp_path, which):
    hooks = tmp_path / "hooks"
    hook, marker = _armed(tmp_path, hooks / "route4" / "before.d" / "10-x")
    d = {"hooks_dir": hooks, "step": hooks / "route4", "before.d": hooks / "route4" / "before.d"}[which]
    os.chown(d, OTHER_UID, -1)
    e = _refused(Hooks(hooks), hook, marker)
    assert str(d) in str(e) and f"uid {OTHER_UID}" in str(e), e


def test_symlink_to_a_file_in_a_writable_dir_refused(tmp_path):
    """The link is trusted, its target is not: symlinks are resolved, then checked."""
    hooks = tmp_path / "hooks"
    (hooks / "route4").mkdir(parents=True)
    outside = tmp_path / "drop"
    outside.mkdir()
    target, marker = _armed(tmp_path, outside / "evil")
    outside.chmod(0o777)
    link = hooks / "route4" / "replace"
    os.symlink(target, link)
    assert Hooks(hooks).find("route4").replace == link
    e = _refused(Hooks(hooks), link, marker)
    assert f"{outside} is group- or world-writable" in str(e), e


def test_sticky_dirs_outside_hooks_dir_are_accepted_but_not_inside(tmp_path):
    """/tmp-like (1777) on the way to a root-owned target outside hooks_dir is fine."""
    hooks = tmp_path / "hooks"
    sticky = tmp_path / "sticky"
    target, marker = _armed(tmp_path, sticky / "ok")
    sticky.chmod(0o1777)
    os.symlink(target, _mk(hooks / "route4") / "replace")
    Hooks(hooks).run(hooks / "route4" / "replace", {}, step="route4", action="up")
    assert marker.exists()
    marker.unlink()
    (hooks / "route4").chmod(0o1777)
    _refused(Hooks(hooks), hooks / "route4" / "replace", marker)
    (hooks / "route4").chmod(0o755)
    target.chmod(0o1777)  # the file itself: never
    _refused(Hooks(hooks), hooks / "route4" / "replace", marker)


def test_symlinked_step_dir_into_a_writable_dir_refused(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    outside = tmp_path / "drop"
    hook, marker = _armed(tmp_path, outside / "replace")
    outside.chmod(0o777)
    os.symlink(outside, hooks / "route4")
    _refused(Hooks(hooks), hooks / "route4" / "replace", marker)


def test_symlinks_to_trusted_targets_run(tmp_path):
    hooks = tmp_path / "hooks"
    real, marker = _armed(tmp_path, hooks / "shared" / "log")
    os.symlink(real, _mk(hooks / "route4") / "replace")
    Hooks(hooks).run(hooks / "route4" / "replace", {}, step="route4", action="up")
    assert marker.exists()
    # outside hooks_dir: the whole path from / must be trusted (true for /bin/true)
    os.symlink("/bin/true", _mk(hooks / "route6") / "replace")
    assert Hooks(hooks).run(hooks / "route6" / "replace", {}, step="route6",
                            action="up").exit_code == 0


def _mk(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_symlinked_hooks_dir_is_resolved_then_checked(tmp_path):
    real = tmp_path / "real-hooks"
    hook, marker = _armed(tmp_path, real / "route4" / "replace")
    os.symlink(real, tmp_path / "hooks")
    Hooks(tmp_path / "hooks").run(tmp_path / "hooks" / "route4" / "replace", {},
                                  step="route4", action="up")
    assert marker.exists()
    marker.unlink()
    real.chmod(0o777)
    _refused(Hooks(tmp_path / "hooks"), tmp_path / "hooks" / "route4" / "replace", marker)


def test_journaled_hook_outside_any_hooks_dir_checked_from_root(tmp_path):
    """Undo of a journaled hook with hooks now disabled (Hooks(None)): checked from /."""
    d = tmp_path / "old"
    hook, marker = _armed(tmp_path, d / "replace")
    Hooks(None).run(hook, {}, step="route4", action="down")  # tmp_path's parents are trusted
    marker.unlink()
    d.chmod(0o777)
    with pytest.raises(HookError):
        Hooks(None).run(hook, {}, step="route4", action="down")
    assert not marker.exists()


def test_every_symlink_hop_is_checked(tmp_path):
    """hook -> a/link -> b/file: a trusted final file is not enough if `a` is writable."""
    hooks = tmp_path / "hooks"
    final, marker = _armed(tmp_path, tmp_path / "b" / "file")
    a = _mk(tmp_path / "a")
    os.symlink(final, a / "link")
    os.symlink(a / "link", _mk(hooks / "route4") / "replace")
    Hooks(hooks).run(hooks / "route4" / "replace", {}, step="route4", action="up")
    assert marker.exists()
    marker.unlink()
    a.chmod(0o777)
    e = _refused(Hooks(hooks), hooks / "route4" / "replace", marker)
    assert f"{a} is group- or world-writable" in str(e), e


def test_hooks_dir_inside_a_writable_directory_refused(tmp_path):
    """Whoever can rename hooks_dir's parent can swap the whole hooks directory."""
    parent = _mk(tmp_path / "shared")
    hook, marker = _armed(tmp_path, parent / "hooks" / "route4" / "replace")
    parent.chmod(0o777)
    e = _refused(Hooks(parent / "hooks"), hook, marker)
    assert f"{parent} is group- or world-writable" in str(e), e


@needs_root
def test_symlink_owned_by_another_user_in_a_sticky_dir_refused(tmp_path):
    sticky = _mk(tmp_path / "sticky")
    sticky.chmod(0o1777)
    target, marker = _armed(tmp_path, tmp_path / "t" / "hook")
    os.symlink(target, sticky / "link")
    os.lchown(sticky / "link", OTHER_UID, -1)
    os.symlink(sticky / "link", _mk(tmp_path / "hooks" / "route4") / "replace")
    e = _refused(Hooks(tmp_path / "hooks"), tmp_path / "hooks" / "route4" / "replace", marker)
    assert f"{sticky / 'link'} is a symlink owned by uid {OTHER_UID}" in str(e), e


# --- issue 16: the file checked is the file executed ---------------------------------------------


def test_a_missing_path_component_is_refused_not_trusted(tmp_path):
    """A trusted symlink to a path that does not exist yet must not pass: whoever creates the
    missing part (here in a sticky, world-writable dir) would choose what runs as root."""
    from netconf._hooks import UntrustedHook, check_trusted

    sticky = _mk(tmp_path / "sticky")
    sticky.chmod(0o1777)
    hooks = tmp_path / "hooks"
    os.symlink(sticky / "later" / "hook", _mk(hooks / "route4") / "replace")
    with pytest.raises(UntrustedHook, match="does not exist"):
        check_trusted(hooks / "route4" / "replace", hooks)
    marker = tmp_path / "ran"
    e = _refused(Hooks(hooks), hooks / "route4" / "replace", marker)
    assert "does not exist" in str(e) and "refused" in str(e), e


def test_the_file_checked_is_the_file_executed(tmp_path, monkeypatch):
    """A hook swapped after the check (here: just before the exec) does not run: qsup executes
    the inode it checked, through the fd it opened (/proc/self/fd/N), not the path again."""
    from netconf import _hooks

    out = tmp_path / "out"
    hooks = tmp_path / "hooks"
    hook = sh(hooks / "route4" / "replace", f"echo checked > {out}")
    swap = sh(tmp_path / "swap", f"echo swapped > {out}")
    real_popen = _hooks.subprocess.Popen

    def popen(*a, **kw):
        os.replace(swap, hook)
        return real_popen(*a, **kw)

    monkeypatch.setattr(_hooks.subprocess, "Popen", popen)
    Hooks(hooks).run(hook, {}, step="route4", action="up")
    assert out.read_text() == "checked\n"


def test_a_file_swapped_between_the_check_and_the_open_is_refused(tmp_path, monkeypatch):
    from netconf import _hooks

    hooks = tmp_path / "hooks"
    hook, marker = _armed(tmp_path, hooks / "route4" / "replace")
    other = sh(tmp_path / "other", f"touch {marker}")
    real_check = _hooks._trusted

    def check(path, hooks_dir):
        checked = real_check(path, hooks_dir)
        os.replace(other, hook)
        return checked

    monkeypatch.setattr(_hooks, "_trusted", check)
    e = _refused(Hooks(hooks), hook, marker)
    assert "changed" in str(e), e
