"""The ``qsup`` command line.

Exit codes scripts can trust: 0 success; 1 the operation failed (the
instance crashed, a start was rolled back, the daemon answered an error);
2 bad input (a spec or config error naming the field, a usage error);
3 the daemon could not be reached.  Errors are one line on stderr, never a
traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tomllib
from pathlib import Path
from typing import NoReturn

import click
import trio

from . import _log
from ._config import Config, load_config
from ._spec import IO_LIMITS, SpecError, load_spec_file

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"qsup: error: {message}", err=True)
    sys.exit(code)


def _config(path, **overrides) -> Config:
    try:
        return load_config(path, **overrides)
    except SpecError as e:
        fail(f"config: {e}", EXIT_USAGE)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qsup")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(_version(), "--version", "-V", prog_name="qsup", message="%(prog)s %(version)s")
def main() -> None:
    """qsup: a QEMU process supervisor.

    \b
    Shell completion (commands, options, instance names), e.g. in ~/.bashrc:
      eval "$(_QSUP_COMPLETE=bash_source qsup)"
    (zsh: zsh_source, fish: fish_source)
    """


def _human(value) -> str:
    """A value for people: no Python reprs, no None."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_human(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={_human(v)}" for k, v in value.items() if v not in (None, "", [], {}))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _event_extra(ev: dict) -> str:
    parts = []
    for k, v in ev.items():
        if k in ("seq", "ts", "instance", "type") or v in (None, "", [], {}):
            continue
        parts.append(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (dict, list)) else _human(v)}")
    return " ".join(parts)


def _print_event(ev: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(ev, separators=(",", ":")))
    else:
        ts = ev.get("ts")
        when = _log.format_ts(ts) if isinstance(ts, (int, float)) else "-"
        click.echo(f"{when} {ev['seq']:>6} {ev.get('instance') or '-':<16} {ev['type']:<24} {_event_extra(ev)[:200]}"
                   .rstrip())


@main.command("run")
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="node config (TOML)")
@click.option("--state-dir", type=click.Path(file_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False))
@click.option("--accel", help="override the config's accelerator")
@click.option("--json", "as_json", is_flag=True, help="events as JSON lines")
@click.option("--socket", hidden=True, help="accepted for uniformity; run serves no API")
def run_cmd(specs, config_path, state_dir, run_dir, accel, as_json, socket) -> None:
    """Supervise SPEC... in the foreground until SIGINT/SIGTERM, then stop them.

    Events are printed on stdout as they happen; logs go to stderr.  Exits
    when every instance has ended on its own, non-zero if any crashed.
    """
    cfg = _config(config_path, state_dir=state_dir, run_dir=run_dir, accel=accel)
    try:
        parsed = [load_spec_file(p) for p in specs]
    except SpecError as e:
        fail(str(e), EXIT_USAGE)
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        fail("name: duplicate instance name among the specs", EXIT_USAGE)
    _log.configure(cfg.log_level, stream=sys.stderr)
    sys.exit(trio.run(_run_foreground, cfg, parsed, as_json))


async def _run_foreground(cfg: Config, specs, as_json: bool) -> int:
    from ._node import Node, open_event_log
    from ._state import State

    events = open_event_log(cfg)

    def print_event(ev: dict) -> None:
        _print_event(ev, as_json)
        sys.stdout.flush()

    events.subscribe_sink(print_event)
    node = Node(cfg, events)
    code = 0
    try:
        async with node.running():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                try:
                    for spec in specs:
                        await node.start(spec)
                except Exception as e:  # noqa: BLE001 - reported as one line, rolled back
                    click.echo(f"qsup: error: {e}", err=True)
                    await node.stop_all()
                    return EXIT_USAGE if isinstance(e, SpecError) else EXIT_FAILED

                async def all_done(cancel):
                    for inst in node.list():
                        await inst.done.wait()
                    cancel.cancel()

                async with trio.open_nursery() as n:
                    n.start_soon(all_done, n.cancel_scope)
                    async for _sig in sigs:
                        break
                    n.cancel_scope.cancel()
                await node.stop_all()
            if any(i.state in (State.CRASHED, State.FAILED) for i in node.list()):
                code = EXIT_FAILED
    finally:
        events.close()
    return code


# -- the daemon and its clients ---------------------------------------------------------------
#
# Every client command takes --json and --socket PATH ($QSUP_SOCKET; default: the socket of
# /etc/qsup/qsup.toml if that exists, else /run/qsup/qsup.sock), or --url + --token-file for a
# daemon's TCP listener.  Errors: one line on stderr, exit code as in the module docstring.


def _complete_names(ctx: click.Context, param, incomplete: str):
    """Shell completion for NAME: the instance names the daemon knows (quietly nothing if none)."""
    from click.shell_completion import CompletionItem

    from ._client import Client

    socket_path = ctx.params.get("socket_path") or os.environ.get("QSUP_SOCKET")
    try:
        with Client(socket_path, timeout=1.0) as c:
            views = c.list()
    except Exception:  # noqa: BLE001 -- completion must never print errors into the prompt
        return []
    return [CompletionItem(v["name"], help=v.get("state")) for v in views if v["name"].startswith(incomplete)]


def _name_argument(f):
    return click.argument("name", shell_complete=_complete_names)(f)


def _client_options(f=None, *, remote: bool = True, json_output: bool = True):
    """--json, --socket, and (``remote``) --url/--token-file for a daemon's TCP listener.

    Commands that need the daemon's host (``qmp``, ``console``: local unix socket, local file)
    get ``remote=False``: --url is then not offered, and, if given anyway, refused in one line.
    """
    def deco(f):
        if remote:
            for opt, env, what in (("--key", "QSUP_KEY", "client key for --cert (PEM)"),
                                   ("--cert", "QSUP_CERT", "client certificate for an https --url (PEM)"),
                                   ("--cacert", "QSUP_CACERT", "CA that signed the daemon's certificate (PEM)")):
                f = click.option(opt, envvar=env, type=click.Path(dir_okay=False), expose_value=False,
                                 callback=_store_tls_option, help=f"{what} [${env}]")(f)
            f = click.option("--token-file", envvar="QSUP_TOKEN_FILE", type=click.Path(dir_okay=False),
                             help="bearer token for --url [$QSUP_TOKEN_FILE]")(f)
            f = click.option("--url", envvar="QSUP_URL",
                             help="daemon TCP URL instead of the socket: https://HOST:PORT, or "
                                  "http:// to a loopback address [$QSUP_URL]")(f)
        else:
            f = click.option("--token-file", hidden=True)(f)
            f = click.option("--url", hidden=True)(f)
        f = click.option("--socket", "socket_path", envvar="QSUP_SOCKET", type=click.Path(),
                         help="daemon API socket [$QSUP_SOCKET]")(f)
        f = click.option("--json", "as_json", is_flag=True, hidden=not json_output,
                         help="machine-readable output")(f)
        return f

    return deco(f) if f is not None else deco


def _store_tls_option(ctx: click.Context, param: click.Parameter, value):
    if value is not None:
        ctx.meta.setdefault("qsup_tls", {})[param.name] = value
    return value


def _connect(socket_path, url, token_file):
    from ._client import Client, ClientTlsError

    token = None
    if url and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            fail(f"token file {token_file}: {e.strerror}", EXIT_USAGE)
    ctx = click.get_current_context(silent=True)
    tls = dict(ctx.meta.get("qsup_tls", {})) if ctx is not None else {}
    if tls and not url:
        fail(f"{next(iter(tls))}: only with an https --url", EXIT_USAGE)
    try:
        return Client(socket_path, url=url, token=token, cacert=tls.get("cacert"), cert=tls.get("cert"),
                      key=tls.get("key"))
    except ClientTlsError as e:
        fail(str(e), EXIT_USAGE)


class _Calls:
    """Run client calls, mapping failures to one stderr line and the documented exit code."""

    def __init__(self, socket_path, url, token_file):
        self.client = _connect(socket_path, url, token_file)

    def __enter__(self):
        return self.client

    def __exit__(self, typ, exc, tb):
        from ._client import RequestFailed, StreamLost, Unreachable

        self.client.close()
        if isinstance(exc, StreamLost):
            fail(f"{exc}; resume with --since {exc.last_seq}", EXIT_UNREACHABLE)
        if isinstance(exc, Unreachable):
            fail(str(exc), EXIT_UNREACHABLE)
        if isinstance(exc, RequestFailed):
            usage = exc.code == "invalid_spec" or exc.status in (400, 413)
            fail(str(exc), EXIT_USAGE if usage else EXIT_FAILED)
        return False


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, separators=(",", ":")))


def _nic_summary(nic: dict) -> str:
    where = nic.get("ip") or nic.get("ip6") or nic.get("link") or "-"
    vlan = f".{nic['vlan']}" if nic.get("vlan") else ""
    return f"{nic.get('mode')}:{where}{vlan}"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@main.command("serve")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="node config (TOML); default /etc/qsup/qsup.toml if it exists")
@click.option("--socket", "socket_path", type=click.Path(), help="API socket to serve (overrides the config)")
@click.option("--json", "as_json", is_flag=True, hidden=True, help="accepted for uniformity: logs are JSON")
def serve_cmd(config_path, socket_path, as_json) -> None:
    """Run the node daemon: the HTTP API on the socket, reattaching recorded instances.

    Logs are JSON lines on stdout; under systemd they go to the journal with their priority and
    an INSTANCE field.  Exits on SIGTERM/SIGINT, leaving the guests running unless the config
    says on_shutdown = "stop".
    """
    from ._client import DEFAULT_CONFIG
    from ._daemon import DaemonError
    from ._daemon import main as daemon_main

    if config_path is None and DEFAULT_CONFIG.exists():
        config_path = str(DEFAULT_CONFIG)
    cfg = _config(config_path, socket=socket_path)
    try:
        sys.exit(daemon_main(cfg))
    except DaemonError as e:
        fail(str(e), EXIT_FAILED)
    except PermissionError as e:
        fail(f"{e.strerror}: {e.filename}", EXIT_FAILED)


@main.command("start")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@_client_options
def start_cmd(spec_path, as_json, socket_path, url, token_file) -> None:
    """Create and start the instance described by SPEC (JSON or TOML); waits until it runs."""
    try:
        spec = load_spec_file(spec_path)
    except SpecError as e:
        fail(str(e), EXIT_USAGE)
    with _Calls(socket_path, url, token_file) as c:
        view = c.start(spec.model_dump(mode="json", exclude_none=True))
    if as_json:
        _echo_json(view)
    else:
        pid = f" (pid {view['pid']})" if view.get("pid") else ""
        click.echo(f"{view['name']}: {view['state']}{pid}")


@main.command("ls")
@_client_options
def ls_cmd(as_json, socket_path, url, token_file) -> None:
    """List the node's instances."""
    with _Calls(socket_path, url, token_file) as c:
        views = c.list()
    if as_json:
        _echo_json(views)
        return
    rows = [["NAME", "STATE", "PID", "MEM", "CPUS", "NICS"]]
    for v in views:
        rows.append([v["name"], v["state"], _human(v.get("pid")), _human(v.get("memory")),
                     _human(v.get("vcpus")), ",".join(_nic_summary(n) for n in v.get("nics", [])) or "-"])
    _table(rows)


@main.command("show")
@_name_argument
@_client_options
def show_cmd(name, as_json, socket_path, url, token_file) -> None:
    """Show one instance (with --json: the full view object)."""
    with _Calls(socket_path, url, token_file) as c:
        v = c.show(name)
    if as_json:
        _echo_json(v)
        return
    for key in ("name", "state", "pid", "memory", "vcpus", "tags", "qmp_operator", "console", "error"):
        if key in v:
            click.echo(f"{key + ':':<14}{_human(v[key])}")
    for i, n in enumerate(v.get("nics", [])):
        parts = [f"{k}={_human(n[k])}" for k in ("mac", "mode", "tap", "link", "ip", "ip6", "vlan", "trunks",
                                                  "queues", "pci_slot") if n.get(k) not in (None, [], "")]
        click.echo(f"{f'nic{i}:':<14}{' '.join(parts)}")
    for d in v.get("disks") or []:
        parts = [f"{k}={_human(d[k])}" for k in ("path", "format", "readonly", "cache", "pci_slot", "boot",
                                                  *IO_LIMITS) if d.get(k) not in (None, False)]
        click.echo(f"{'disk ' + str(d.get('id')) + ':':<14}{' '.join(parts)}")
    m = v.get("migration")
    if m:
        click.echo(f"{'migration:':<14}{_human({k: m.get(k) for k in ('status', 'result', 'to', 'error')})}")


@main.command("stop")
@_name_argument
@click.option("--force", is_flag=True, help="SIGTERM QEMU instead of a guest powerdown")
@click.option("--timeout", type=click.FloatRange(0, 3600), help="seconds the guest gets to power down")
@_client_options
def stop_cmd(name, force, timeout, as_json, socket_path, url, token_file) -> None:
    """Stop an instance and wait until QEMU has exited and its network is undone."""
    with _Calls(socket_path, url, token_file) as c:
        v = c.stop(name, force=force, timeout=timeout)
    if as_json:
        _echo_json(v)
    else:
        click.echo(f"{v['name']}: {v['state']}")


@main.command("upgrade")
@click.argument("name", required=False)
@click.option("--qemu", "qemu", type=str, help="the new QEMU binary (absolute); default: the node's qemu as it is now")
@click.option("--all", "all_", is_flag=True, help="every instance whose running QEMU is not the installed one")
@click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="with --all: upgrades at once")
@_client_options
def upgrade_cmd(name, qemu, all_, parallel, as_json, socket_path, url, token_file) -> None:
    """Move NAME into a new QEMU on this node, on the same taps and disks: no reboot, no network change."""
    if bool(name) == all_:
        raise click.UsageError("give NAME or --all")
    if name:
        with _Calls(socket_path, url, token_file) as c:
            r = c.upgrade(name, qemu)
        if as_json:
            _echo_json(r)
        else:
            u = r["upgrade"]
            click.echo(f"{name}: pid {u['old_pid']} -> {u['pid']} ({u['mode']}, downtime "
                       f"{u.get('downtime_ms')} ms, {u['total_ms']:.0f} ms in all)")
        return
    _upgrade_all(qemu, parallel, as_json, socket_path, url, token_file)


def _upgrade_all(qemu, parallel, as_json, socket_path, url, token_file) -> None:
    """Every outdated instance, ``parallel`` at a time, with a progress bar on stderr and a summary."""
    from concurrent.futures import ThreadPoolExecutor

    with _Calls(socket_path, url, token_file) as c:
        todo = [v["name"] for v in c.list() if (v.get("qemu") or {}).get("outdated")
                and v["state"] in ("running", "paused")]
    results: dict[str, dict] = {}

    def one(n: str) -> tuple[str, dict]:
        c = _connect(socket_path, url, token_file)
        try:
            return n, {"ok": True, **c.upgrade(n, qemu)["upgrade"]}
        except Exception as e:  # noqa: BLE001 -- reported per instance in the summary
            return n, {"ok": False, "error": str(e)}
        finally:
            c.close()

    with ThreadPoolExecutor(parallel) as pool, \
            click.progressbar(length=len(todo), label="upgrading", file=sys.stderr) as bar:
        for n, r in pool.map(one, todo):
            results[n] = r
            bar.update(1)
    failed = [n for n, r in results.items() if not r["ok"]]
    if as_json:
        _echo_json({"upgraded": [n for n in results if n not in failed], "failed": failed, "results": results})
    else:
        for n, r in results.items():
            click.echo(f"{n}: " + (f"pid {r['old_pid']} -> {r['pid']}" if r["ok"] else f"FAILED: {r['error']}"))
        click.echo(f"{len(results) - len(failed)} upgraded, {len(failed)} failed, "
                   f"{len(todo) and len(todo) - len(results)} skipped")
    if failed:
        raise SystemExit(1)


@main.command("rm")
@_name_argument
@_client_options
def rm_cmd(name, as_json, socket_path, url, token_file) -> None:
    """Delete NAME: force-stop it if it still runs, then forget it (its records go)."""
    with _Calls(socket_path, url, token_file) as c:
        v = c.delete(name)
    if as_json:
        _echo_json(v)
    else:
        click.echo(f"{v.get('name', name)}: deleted")


@main.group("disk")
def disk_group() -> None:
    """Live disk changes: hotplug, unplug, resize, I/O limits (the guest keeps running)."""


def _disk_spec_arg(spec: str) -> dict:
    """SPEC: a JSON object, or a JSON/TOML file holding one disk."""
    if spec.lstrip().startswith("{"):
        text, where = spec, "the disk spec"
    else:
        try:
            text, where = Path(spec).read_text(), spec
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read disk spec {spec!r}: {getattr(e, 'strerror', None) or e}", EXIT_USAGE)
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except ValueError as e:
        fail(f"{where}: not valid JSON/TOML: {e}", EXIT_USAGE)
    if not isinstance(data, dict):
        fail(f"{where}: must be an object (one disk)", EXIT_USAGE)
    return data


def _disk_line(name: str, what: str, disk: dict) -> str:
    keys = ("path", "format", "readonly", "pci_slot", "size", "previous", *IO_LIMITS)
    return f"{name}: disk {disk.get('id')} {what} " + " ".join(
        f"{k}={_human(disk[k])}" for k in keys if disk.get(k) not in (None, False))


@disk_group.command("add")
@_name_argument
@click.argument("spec", metavar="SPEC")
@_client_options
def disk_add_cmd(name, spec, as_json, socket_path, url, token_file) -> None:
    """Hotplug a disk into NAME.  SPEC: a JSON object or a JSON/TOML file (id, path, format, ...)."""
    data = _disk_spec_arg(spec)
    with _Calls(socket_path, url, token_file) as c:
        r = c.add_disk(name, data)
    _echo_json(r) if as_json else click.echo(_disk_line(name, "added", r["disk"]))


@disk_group.command("rm")
@_name_argument
@click.argument("disk_id", metavar="ID")
@_client_options
def disk_rm_cmd(name, disk_id, as_json, socket_path, url, token_file) -> None:
    """Unplug disk ID from NAME (waits until the guest released it)."""
    with _Calls(socket_path, url, token_file) as c:
        r = c.remove_disk(name, disk_id)
    _echo_json(r) if as_json else click.echo(f"{name}: disk {disk_id} removed")


@disk_group.command("resize")
@_name_argument
@click.argument("disk_id", metavar="ID")
@click.argument("size", metavar="SIZE")
@_client_options
def disk_resize_cmd(name, disk_id, size, as_json, socket_path, url, token_file) -> None:
    """Grow disk ID of NAME to SIZE (bytes, or 10G-style binary units)."""
    with _Calls(socket_path, url, token_file) as c:
        r = c.resize_disk(name, disk_id, int(size) if size.isdigit() else size)
    _echo_json(r) if as_json else click.echo(_disk_line(name, "resized", r["disk"]))


def _limit_options(f):
    for key in reversed(IO_LIMITS):
        unit = "BYTES/S" if key.startswith("bps") else "OPS/S"
        f = click.option(f"--{key.replace('_', '-')}", key, metavar=unit, help=f"{key} limit; 0 removes it")(f)
    return f


@disk_group.command("limits")
@_name_argument
@click.argument("disk_id", metavar="ID")
@_limit_options
@_client_options
def disk_limits_cmd(name, disk_id, as_json, socket_path, url, token_file, **limits) -> None:
    """Change disk ID's I/O limits live; limits not given stay as they are."""
    body: dict = {}
    for k, v in limits.items():
        if v is None:
            continue
        if not v.isdigit():
            fail(f"--{k.replace('_', '-')}: {v!r} is not a non-negative integer", EXIT_USAGE)
        body[k] = int(v) or None
    if not body:
        fail("give at least one of " + ", ".join(f"--{k.replace('_', '-')}" for k in IO_LIMITS), EXIT_USAGE)
    with _Calls(socket_path, url, token_file) as c:
        r = c.set_disk_limits(name, disk_id, body)
    _echo_json(r) if as_json else click.echo(_disk_line(name, "limits", r["disk"]))


@main.group("nic")
def nic_group() -> None:
    """Live NIC changes: hotplug, unplug, a new network for a NIC (the guest keeps running)."""


def _nic_spec_arg(spec: str) -> dict:
    """NICSPEC: a JSON object, or a JSON/TOML file holding one NIC."""
    if spec.lstrip().startswith("{"):
        text, where = spec, "the NIC spec"
    else:
        try:
            text, where = Path(spec).read_text(), spec
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read NIC spec {spec!r}: {getattr(e, 'strerror', None) or e}", EXIT_USAGE)
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except ValueError as e:
        fail(f"{where}: not valid JSON/TOML: {e}", EXIT_USAGE)
    if not isinstance(data, dict):
        fail(f"{where}: must be an object (one NIC)", EXIT_USAGE)
    return data


def _nic_line(name: str, what: str, nic: dict) -> str:
    keys = ("mode", "link", "ip", "ip6", "vlan", "queues", "pci_slot")
    return f"{name}: nic {nic.get('mac')} {what} " + " ".join(
        f"{k}={_human(nic[k])}" for k in keys if nic.get(k) not in (None, [], ""))


@nic_group.command("add")
@_name_argument
@click.argument("spec", metavar="NICSPEC")
@_client_options
def nic_add_cmd(name, spec, as_json, socket_path, url, token_file) -> None:
    """Hotplug a NIC into NAME.  NICSPEC: a JSON object or a JSON/TOML file (mode, link, ip, mac, ...)."""
    data = _nic_spec_arg(spec)
    with _Calls(socket_path, url, token_file) as c:
        r = c.add_nic(name, data)
    _echo_json(r) if as_json else click.echo(_nic_line(name, "added", r["nic"]))


@nic_group.command("rm")
@_name_argument
@click.argument("mac", metavar="MAC")
@_client_options
def nic_rm_cmd(name, mac, as_json, socket_path, url, token_file) -> None:
    """Unplug NIC MAC from NAME (waits until the guest released it); its host network goes."""
    with _Calls(socket_path, url, token_file) as c:
        r = c.remove_nic(name, mac)
    _echo_json(r) if as_json else click.echo(f"{name}: nic {mac.lower()} removed")


@nic_group.command("set")
@_name_argument
@click.argument("mac", metavar="MAC")
@click.argument("spec", metavar="NICSPEC")
@_client_options
def nic_set_cmd(name, mac, spec, as_json, socket_path, url, token_file) -> None:
    """Give NIC MAC of NAME a new network live (NICSPEC: its whole new spec; MAC, queues, slot stay).
    Only what differs is changed on the host; an L2 change bounces the guest's link."""
    data = _nic_spec_arg(spec)
    with _Calls(socket_path, url, token_file) as c:
        r = c.set_nic(name, mac, data)
    _echo_json(r) if as_json else click.echo(_nic_line(name, "changed", r["nic"]))


@main.command("events")
@click.option("--follow", "-f", is_flag=True, help="keep printing new events")
@click.option("--since", type=click.IntRange(0), default=0, show_default=True,
              help="only events with seq > SINCE")
@click.option("--reconnect/--no-reconnect", default=True, show_default=True,
              help="with --follow: when the daemon stops or restarts, wait for it and resume after the "
                   "last seq printed; --no-reconnect exits 3 instead, saying which --since resumes")
@_client_options
def events_cmd(follow, since, reconnect, as_json, socket_path, url, token_file) -> None:
    """Print the event stream: time (UTC), seq, instance, type, details.

    With --json: one event object per line.  With --follow it keeps printing new events and
    survives daemon restarts (no gap, no duplicate: seq is persisted); a note on stderr says
    when the stream was lost and when it resumed.
    """
    def lost(e) -> None:
        click.echo(f"qsup: {e}; reconnecting (resumes after seq {e.last_seq})", err=True)

    def resumed(seq: int) -> None:
        click.echo(f"qsup: reconnected, resuming after seq {seq}", err=True)

    try:
        with _Calls(socket_path, url, token_file) as c:
            stream = (c.follow_events(since, reconnect=reconnect, on_lost=lost, on_resumed=resumed) if follow
                      else c.events(since=since))
            for ev in stream:
                _print_event(ev, as_json)
                if follow:
                    sys.stdout.flush()
    except KeyboardInterrupt:
        sys.exit(0)
    except BrokenPipeError:
        sys.stderr.close()  # reader went away (`| head`): not an error
        sys.exit(0)


@main.command("migrate")
@_name_argument
@click.option("--to", "to", metavar="NODE", help="destination node: a key of the node config's [peers]")
@click.option("--postcopy", is_flag=True, help="switch to post-copy after the first pass")
@click.option("--max-bandwidth", type=click.IntRange(1), metavar="BYTES/S")
@click.option("--downtime-limit", type=click.IntRange(1), metavar="MS")
@click.option("--switchover", type=click.Choice(["stop", "pause"]), default="stop", show_default=True,
              help="where the source releases the guest's L3: at the guest's STOP, or inside QEMU's "
                   "pause-before-switchover (refused where it was measured to corrupt guests)")
@click.option("--cancel", is_flag=True, help="cancel NAME's migration in progress")
@click.option("--detach", is_flag=True, help="start it and return without following")
@_client_options
def migrate_cmd(name, to, postcopy, max_bandwidth, downtime_limit, switchover, cancel, detach, as_json,
                socket_path, url, token_file) -> None:
    """Live-migrate NAME to NODE, showing progress; ends with a summary.

    The progress bar is fed by query-migrate (<= 4 Hz); QEMU's MIGRATION
    events alone decide the outcome.  Exit 0 when the migration completed,
    1 when it failed or was cancelled (the guest then keeps running here).
    """
    if cancel:
        with _Calls(socket_path, url, token_file) as c:
            v = c.cancel_migration(name)
        _echo_json(v) if as_json else click.echo(f"{name}: cancel requested")
        return
    if not to:
        fail("to: --to NODE is required", EXIT_USAGE)
    from ._config import NODE_NAME_RE

    if not NODE_NAME_RE.match(to):  # a URL or a socket path: refused before anything is contacted
        fail(f"to: {to[:80]!r} is not a node name; --to names a peer declared in the node config's [peers]",
             EXIT_USAGE)
    with _Calls(socket_path, url, token_file) as c:
        c.migrate(name, to, postcopy=postcopy, max_bandwidth=max_bandwidth, downtime_limit=downtime_limit,
                  switchover=switchover)
        if detach:
            _echo_json({"name": name, "to": to, "status": "started"}) if as_json else \
                click.echo(f"{name}: migration to {to} started")
            return
        m = _follow_migration(c, name, quiet=as_json)
    summary = {"name": name, "to": to, "result": m.get("result") or "failed", "error": m.get("error"),
               "total_ms": m.get("total_ms"), "downtime_ms": m.get("downtime_ms"),
               "switchover_ms": m.get("switchover_ms"),
               "activation": m.get("activation")}
    if as_json:
        _echo_json(summary)
    else:
        click.echo(f"{name}: {summary['result']}" + (f" ({summary['error']})" if summary["error"] else ""))
        line = _migration_numbers(summary)
        if line:
            click.echo(f"  {line}")
    sys.exit(0 if summary["result"] == "completed" else EXIT_FAILED)


def _migration_numbers(summary: dict) -> str:
    """The summary's timings, each only when QEMU/the daemon reported it (never "None ms")."""
    act = summary.get("activation") or {}

    def ms(v) -> str | None:
        return f"{v:g} ms" if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    parts = [(f"total {ms(summary.get('total_ms'))}", ms(summary.get("total_ms"))),
             (f"downtime {ms(summary.get('downtime_ms'))} (QEMU)", ms(summary.get("downtime_ms"))),
             (f"source stop -> destination completed {ms(summary.get('switchover_ms'))}",
              ms(summary.get("switchover_ms"))),
             (f"activation {ms(act.get('event_to_cont_ms'))} from the completed event to cont",
              ms(act.get("event_to_cont_ms"))),
             (f"L3 after {ms(act.get('event_to_l3_ms'))}", ms(act.get("event_to_l3_ms")))]
    return ", ".join(text for text, value in parts if value)


def _follow_migration(c, name: str, quiet: bool) -> dict:
    """Poll the instance view at 4 Hz until its migration has a result; a rich bar shows progress."""
    import time as _time

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    t0 = _time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TextColumn("{task.fields[status]}"), disable=quiet, transient=False) as bar:
        task = bar.add_task(f"migrating {name}", total=None, status="setup")
        while True:
            v = c.show(name)
            m = v.get("migration") or {}
            total = m.get("total") or None
            bar.update(task, completed=m.get("transferred", 0), total=total, status=m.get("status", "?"))
            if m.get("result") and v["state"] != "migrating":
                if m["result"] == "completed":  # zero pages are never sent: fill the bar
                    done = total or m.get("transferred", 0)
                    bar.update(task, completed=done, total=done, status="completed")
                m = dict(m)
                m["total_ms"] = m.get("total_ms") or round((_time.monotonic() - t0) * 1000, 1)
                return m
            if v["state"] in ("crashed", "failed"):
                return {"result": "failed", "error": v.get("error")}
            _time.sleep(0.25)


def _local_view(name, socket_path, url, what: str) -> dict:
    """The instance view, for commands that open a local file or socket of the daemon's host."""
    if url:
        fail(f"{what} needs the daemon's local socket (--url is not supported: the {what} is local)", EXIT_USAGE)
    with _Calls(socket_path, None, None) as c:
        return c.show(name)


@main.command("qmp")
@_name_argument
@click.argument("command", required=False)
@click.argument("arguments", metavar="[JSON]", required=False)
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=30, show_default=True,
              help="seconds to wait for the monitor and for the answer")
@_client_options(remote=False)
def qmp_cmd(name, command, arguments, timeout, as_json, socket_path, url, token_file) -> None:
    """Talk QMP to NAME's operator monitor (a second monitor; qsup keeps its own).

    \b
    qsup qmp NAME                          interactive qmp-shell
    qsup qmp NAME query-status             one command: prints its JSON return value
    qsup qmp NAME set_link '{"name": "nic0", "up": false}'

    One-shot exit codes: 0 the command succeeded; 1 QEMU answered an error (its class and
    description on stderr; with --json also {"error": {...}} on stdout); 2 JSON is not an
    object; 3 the daemon or the monitor could not be reached.
    """
    args = None
    if arguments is not None:
        try:
            args = json.loads(arguments)
        except ValueError as e:
            fail(f"arguments: invalid JSON: {e}", EXIT_USAGE)
        if not isinstance(args, dict):
            fail("arguments: must be a JSON object", EXIT_USAGE)
    v = _local_view(name, socket_path, url, "monitor")
    path = v.get("qmp_operator")
    if v["state"] in ("stopped", "crashed", "failed") or not path or not Path(path).exists():
        fail(f"{name} is {v['state']}: no monitor to open", EXIT_FAILED)
    if command is None:
        argv = [sys.executable, "-m", "qemu.qmp.qmp_shell", path]
        os.execv(sys.executable, argv)
    import asyncio

    try:
        ok, value = asyncio.run(_qmp_once(path, command, args, timeout))
    except (OSError, EOFError, asyncio.TimeoutError) as e:
        reason = "timed out (is another client using the operator monitor?)" \
            if isinstance(e, asyncio.TimeoutError) else (str(e) or type(e).__name__)
        fail(f"monitor {path}: {reason}", EXIT_UNREACHABLE)
    except Exception as e:  # noqa: BLE001 -- qemu.qmp's connection errors: one line, no traceback
        fail(f"monitor {path}: {type(e).__name__}: {e}", EXIT_UNREACHABLE)
    if ok:
        _echo_json(value)
        return
    if as_json:
        _echo_json({"error": value})
    err = value if isinstance(value, dict) else {}  # _qmp_once's error object
    fail(f"qmp {command}: {err.get('class', 'Error')}: {err.get('desc', '')}", EXIT_FAILED)


async def _qmp_once(path: str, command: str, args: dict | None, timeout: float) -> tuple[bool, object]:
    """Connect, negotiate, run one command: (True, return value) or (False, QMP error object).

    The command and its arguments go to QEMU as one JSON message: nothing passes a shell.
    """
    import asyncio
    import logging

    from qemu.qmp import ExecuteError, QMPClient

    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # its connection narration is not ours
    client = QMPClient("qsup-cli")
    try:
        await asyncio.wait_for(client.connect(path), timeout)
        try:
            return True, await asyncio.wait_for(client.execute(command, args), timeout)
        except ExecuteError as e:
            return False, {"class": e.error_class, "desc": e.error.error.desc}
    finally:
        await client.disconnect()


@main.command("console")
@_name_argument
@click.option("--lines", "-n", type=click.IntRange(0), default=50, show_default=True,
              help="start with the last N lines (0: only new output)")
@click.option("--follow/--no-follow", "-f", default=True, show_default=True,
              help="keep printing new output until Ctrl-C")
@click.option("--raw", is_flag=True,
              help="write the guest's bytes as they are, escape sequences included (by default "
                   "control characters and terminal escape sequences are dropped)")
@click.option("--attach", is_flag=True,
              help="two-way: what you type goes to the guest; detach with Ctrl-] (one client at a time)")
@click.option("--force", is_flag=True, help="with --attach: take over from the client attached now")
@click.option("--linger", type=click.FloatRange(0, 3600), default=1.0, show_default=True,
              help="with --attach and stdin not a terminal: after stdin ends, detach once the "
                   "console has been quiet this many seconds")
@_client_options(remote=False, json_output=False)
def console_cmd(name, lines, follow, raw, attach, force, linger, as_json, socket_path, url, token_file) -> None:
    """Print NAME's serial console log and follow it (read-only; like tail -f), or --attach.

    The guest writes every byte of it: unless --raw, what would steer your terminal (escape
    sequences setting its title or clipboard, answering queries, clearing the screen; other
    control characters) is dropped, and only text, newlines and tabs are shown.

    \b
    --attach: two-way, through the daemon (the console log keeps recording).  On a terminal
    it is put in raw mode (keys go to the guest as typed; cursor movement, erasing and colours
    are kept from the output) until you detach with Ctrl-]; otherwise stdin is sent as it comes
    and its end detaches (after --linger).  Exit 0 when you detached, 1 when another client
    took over (--force) or the instance stopped."""
    if force and not attach:
        fail("--force: only with --attach", EXIT_USAGE)
    if attach:
        if url:
            fail("console --attach needs the daemon's local socket (--url is not supported)", EXIT_USAGE)
        sys.exit(_attach(name, socket_path, force=force, raw=raw, linger=linger))
    v = _local_view(name, socket_path, url, "console")
    path = Path(v.get("console") or "")
    if not v.get("console"):
        fail(f"{name}: the daemon reports no console", EXIT_FAILED)
    try:
        _tail(path, lines, follow, raw=raw)
    except PermissionError:
        fail(f"console {path}: permission denied (it is readable by root only)", EXIT_FAILED)
    except FileNotFoundError:
        fail(f"console {path}: no such file ({name} is {v['state']})", EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(0)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)


def _tail(path: Path, lines: int, follow: bool, poll: float = 0.2, *, raw: bool = False) -> None:
    """Last ``lines`` lines of ``path``, then (``follow``) new bytes as they come.

    A file that shrinks (truncated, or the instance started again) is read again from the
    start; one that is replaced (rotated: another inode at the path) is read to its end, then
    the new one from its start.  Unless ``raw``, through a :class:`TerminalFilter`.
    """
    import time

    out = sys.stdout.buffer if raw else _FilteredOut(sys.stdout.buffer)
    f = open(path, "rb")  # noqa: SIM115 -- reopened when rotated; closed in the finally below
    try:
        size = os.fstat(f.fileno()).st_size
        back = min(size, 64 * 1024 + lines * 256)
        f.seek(size - back)
        tail = b""
        if lines:
            parts = f.read(back).split(b"\n")
            if back < size:
                parts = parts[1:]  # the first piece may be the end of a cut line
            full, partial = parts[:-1], parts[-1]
            tail = b"".join(line + b"\n" for line in full[-lines:]) + partial
        else:
            f.seek(size)
        out.write(tail)
        out.flush()
        while follow:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            time.sleep(poll)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if st.st_ino != os.fstat(f.fileno()).st_ino:  # rotated: finish the old file first
                while rest := f.read(65536):
                    out.write(rest)
                out.flush()
                f.close()
                f = open(path, "rb")  # noqa: SIM115 -- closed in the finally below
            elif st.st_size < f.tell():
                f.seek(0)
    finally:
        f.close()


#: Ctrl-]: detaches ``console --attach`` (as ``virsh console``)
ESCAPE = b"\x1d"


def _attach(name: str, socket_path, *, force: bool, raw: bool, linger: float) -> int:
    """``console --attach``: stdin to the guest, its output to stdout, until Ctrl-] (or stdin's
    end), a takeover, or the instance's stop.  The exit status."""
    import select
    import threading
    import time

    from ._client import RequestFailed, Unreachable

    with _Calls(socket_path, None, None) as c:
        try:
            session = c.attach_console(name, force=force)
        except RequestFailed as e:
            fail(f"{name}: {e}" if name not in str(e) else str(e), EXIT_FAILED)
    tty_in = sys.stdin.isatty()
    out = sys.stdout.buffer if raw else _FilteredOut(sys.stdout.buffer, interactive=tty_in)
    ended = threading.Event()
    last_output = [time.monotonic()]

    def read_output() -> None:
        try:
            while (f := session.receive()) is not None:
                kind, value = f
                if kind == "output":
                    last_output[0] = time.monotonic()
                    out.write(value)
                    out.flush()
                elif kind == "notice":
                    click.echo(f"\r\n[qsup: {value.get('dropped')} bytes of console output lost so far: this "
                               "terminal lagged behind]\r", err=True)
                else:
                    return
        except (Unreachable, OSError):
            pass
        finally:
            ended.set()

    if tty_in:
        click.echo(f"Connected to the console of {name} (escape character is ^])", err=True)
    reader = threading.Thread(target=read_output, name="console-output", daemon=True)
    reader.start()
    fd = sys.stdin.fileno()
    saved = None
    if tty_in:
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setraw(fd)
    try:
        eof_at = None
        while not ended.is_set():
            if eof_at is not None:
                if time.monotonic() - max(eof_at, last_output[0]) >= linger:
                    break
                ended.wait(0.05)
                continue
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            data = os.read(fd, 4096)
            if not data:
                eof_at = time.monotonic()
                continue
            i = data.find(ESCAPE)
            session.send(data if i < 0 else data[:i])
            if i >= 0:
                break
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        session.detach()
        reader.join(5.0)
        session.close()
    end = session.end or {"reason": "the daemon went away"}
    reason = str(end.get("reason"))
    if tty_in or reason != "detached":
        click.echo(f"\n[qsup: {name}: {reason}]", err=True)
    return 0 if reason == "detached" else EXIT_FAILED


class _FilteredOut:
    """``write``/``flush`` to ``out`` through a :class:`supervisor._console.TerminalFilter`."""

    def __init__(self, out, *, interactive: bool = False) -> None:
        from ._console import TerminalFilter

        self._out, self._filter = out, TerminalFilter(interactive=interactive)

    def write(self, data: bytes) -> None:
        self._out.write(self._filter.feed(data))

    def flush(self) -> None:
        self._out.flush()


if __name__ == "__main__":
    main(prog_name="qsup")
