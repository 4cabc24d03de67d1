"""The ``qsup`` command line.

Exit codes scripts can trust: 0 success; 1 the operation failed (the
instance crashed, a start was rolled back, the daemon answered an error);
2 bad input (a spec or config error naming the field, a usage error);
3 the daemon could not be reached.  Errors are one line on stderr, never a
traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import NoReturn

import click
import trio

from . import _log
from ._config import Config, load_config
from ._spec import SpecError, load_spec_file

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"qsup: error: {message}", err=True)
    sys.exit(code)


def _config(path, **overrides) -> Config:
    try:
        return load_config(path, **overrides)
    except SpecError as e:
        fail(f"config: {e}", EXIT_USAGE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """qsup: a QEMU process supervisor."""


def _print_event(ev: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(ev, separators=(",", ":")))
    else:
        extra = {k: v for k, v in ev.items() if k not in ("seq", "ts", "instance", "type")}
        click.echo(f"{ev['seq']:>6} {ev.get('instance') or '-':<16} {ev['type']:<24} {json.dumps(extra)[:160]}")


@main.command("run")
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="node config (TOML)")
@click.option("--state-dir", type=click.Path(file_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False))
@click.option("--accel", help="override the config's accelerator")
@click.option("--json", "as_json", is_flag=True, help="events as JSON lines")
@click.option("--socket", help="(accepted for uniformity; run does not serve an API)")
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
    _log.configure(stream=sys.stderr)
    sys.exit(trio.run(_run_foreground, cfg, parsed, as_json))


async def _run_foreground(cfg: Config, specs, as_json: bool) -> int:
    from ._node import Node, open_event_log
    from ._state import State

    events = open_event_log(cfg)
    events.subscribe_sink(lambda ev: (_print_event(ev, as_json), sys.stdout.flush()))
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


def _client_options(f):
    f = click.option("--token-file", envvar="QSUP_TOKEN_FILE", type=click.Path(dir_okay=False),
                     help="bearer token for --url")(f)
    f = click.option("--url", envvar="QSUP_URL", help="daemon TCP URL instead of the socket")(f)
    f = click.option("--socket", "socket_path", envvar="QSUP_SOCKET", type=click.Path(),
                     help="daemon API socket [$QSUP_SOCKET]")(f)
    f = click.option("--json", "as_json", is_flag=True, help="machine-readable output")(f)
    return f


def _connect(socket_path, url, token_file):
    from ._client import Client

    token = None
    if url and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            fail(f"token file {token_file}: {e.strerror}", EXIT_USAGE)
    return Client(socket_path, url=url, token=token)


class _Calls:
    """Run client calls, mapping failures to one stderr line and the documented exit code."""

    def __init__(self, socket_path, url, token_file):
        self.client = _connect(socket_path, url, token_file)

    def __enter__(self):
        return self.client

    def __exit__(self, typ, exc, tb):
        from ._client import ApiError, Unreachable

        self.client.close()
        if isinstance(exc, Unreachable):
            fail(str(exc), EXIT_UNREACHABLE)
        if isinstance(exc, ApiError):
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
@_client_options
def serve_cmd(config_path, as_json, socket_path, url, token_file) -> None:
    """Run the node daemon: the HTTP API on the socket, reattaching recorded instances.

    Logs are JSON lines on stdout.  Exits on SIGTERM/SIGINT, leaving the guests running unless
    the config says on_shutdown = "stop".
    """
    from ._client import DEFAULT_CONFIG
    from ._daemon import DaemonError, main as daemon_main

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
        click.echo(f"{view['name']}: {view['state']} (pid {view.get('pid')})")


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
        rows.append([v["name"], v["state"], str(v.get("pid") or "-"), str(v.get("memory", "-")),
                     str(v.get("vcpus", "-")), ",".join(_nic_summary(n) for n in v.get("nics", [])) or "-"])
    _table(rows)


@main.command("show")
@click.argument("name")
@_client_options
def show_cmd(name, as_json, socket_path, url, token_file) -> None:
    """Show one instance (``--json``: the full view object)."""
    with _Calls(socket_path, url, token_file) as c:
        v = c.show(name)
    if as_json:
        _echo_json(v)
        return
    for key in ("name", "state", "pid", "memory", "vcpus", "tags", "qmp_operator", "console", "error"):
        if key in v:
            click.echo(f"{key + ':':<14}{v[key] if v[key] not in (None, []) else '-'}")
    for i, n in enumerate(v.get("nics", [])):
        parts = [f"{k}={n[k]}" for k in ("mac", "mode", "tap", "link", "ip", "ip6", "vlan", "queues")
                 if n.get(k) not in (None, [], "")]
        click.echo(f"{f'nic{i}:':<14}{' '.join(parts)}")


@main.command("stop")
@click.argument("name")
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


@main.command("events")
@click.option("--follow", "-f", is_flag=True, help="keep printing new events")
@click.option("--since", type=click.IntRange(0), default=0, show_default=True,
              help="only events with seq > SINCE")
@_client_options
def events_cmd(follow, since, as_json, socket_path, url, token_file) -> None:
    """Print the event stream (``--json``: one event object per line)."""
    try:
        with _Calls(socket_path, url, token_file) as c:
            for ev in c.events(since=since, follow=follow):
                _print_event(ev, as_json)
    except KeyboardInterrupt:
        sys.exit(0)
    except BrokenPipeError:
        sys.stderr.close()  # reader went away (`| head`): not an error
        sys.exit(0)


@main.command("migrate")
@click.argument("name")
@click.option("--to", "to", metavar="NODE", help="destination daemon: its socket path or http://host:port")
@click.option("--postcopy", is_flag=True, help="switch to post-copy after the first pass")
@click.option("--max-bandwidth", type=click.IntRange(1), metavar="BYTES/S")
@click.option("--downtime-limit", type=click.IntRange(1), metavar="MS")
@click.option("--cancel", is_flag=True, help="cancel NAME's migration in progress")
@click.option("--detach", is_flag=True, help="start it and return without following")
@_client_options
def migrate_cmd(name, to, postcopy, max_bandwidth, downtime_limit, cancel, detach, as_json, socket_path,
                url, token_file) -> None:
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
    with _Calls(socket_path, url, token_file) as c:
        c.migrate(name, to, postcopy=postcopy, max_bandwidth=max_bandwidth, downtime_limit=downtime_limit)
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
        act = summary["activation"] or {}
        click.echo(f"{name}: {summary['result']}" + (f" ({summary['error']})" if summary["error"] else ""))
        click.echo(f"  total {summary['total_ms']} ms, downtime {summary['downtime_ms']} ms (QEMU), "
                   f"source stop -> destination completed {summary['switchover_ms']} ms, "
                   f"activation {act.get('event_to_cont_ms', '-')} ms from the completed event to cont "
                   f"(L3 after {act.get('event_to_l3_ms', '-')} ms)")
    sys.exit(0 if summary["result"] == "completed" else EXIT_FAILED)


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


@main.command("qmp")
@click.argument("name")
@_client_options
def qmp_cmd(name, as_json, socket_path, url, token_file) -> None:
    """Open qmp-shell on NAME's operator monitor (a second QMP monitor; qsup keeps its own)."""
    if url:
        fail("qmp needs the daemon's local socket (the monitor is a local unix socket)", EXIT_USAGE)
    with _Calls(socket_path, url, token_file) as c:
        v = c.show(name)
    path = v.get("qmp_operator")
    if v["state"] in ("stopped", "crashed", "failed") or not path or not Path(path).exists():
        fail(f"{name} is {v['state']}: no monitor to open", EXIT_FAILED)
    import os

    argv = [sys.executable, "-m", "qemu.qmp.qmp_shell", path]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
