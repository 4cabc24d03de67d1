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

import click
import trio

from . import _log
from ._config import Config, load_config
from ._spec import SpecError, load_spec_file

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def fail(message: str, code: int = EXIT_FAILED) -> "NoReturn":  # noqa: F821
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
    from ._eventlog import EventLog
    from ._node import Node
    from ._state import State

    events = EventLog(cfg.state_dir / "events.db", retention=cfg.event_retention)
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


if __name__ == "__main__":
    main()
