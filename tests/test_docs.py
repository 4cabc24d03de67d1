"""README.md cannot drift from the code it documents (issue 15).

* The node-config table ("### Node config") lists every key of :class:`supervisor._config.Config`
  and nothing else.
* The command list ("## Use") shows every ``qsup`` command the CLI has, and no other.
* The NIC modes and the hook phases they list are netconf's (``netconf.MODES``, ``netconf.REASONS``),
  the name pattern the spec's (``NAME_PATTERN``).
* The client generator command uses the same NDJSON override as the project's own generated-client
  test (``integration/test_openapi_client.py``): without it the generator warns and leaves the
  event stream out of the client.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import netconf
from supervisor._cli import main
from supervisor._config import Config
from supervisor._spec import NAME_PATTERN

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _section(text: str, heading: str) -> str:
    """The lines under ``heading`` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    assert start is not None, f"README.md has no {heading!r} section"
    out = []
    for line in lines[start + 1:]:
        m = re.match(r"(#+) ", line)
        if m and len(m.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out)


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def readme_config_keys(text: str) -> set[str]:
    """Every key named in the first column of the node-config table (``tls_ca``, ``[peers]``...)."""
    keys: set[str] = set()
    for line in _section(text, "### Node config (TOML; unknown keys refused)").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("key", "") or set(cells[0]) <= set("-"):
            continue
        names = re.findall(r"`\[?([A-Za-z0-9_]+)\]?`", cells[0])
        assert names, f"README node-config row names no key: {line!r}"
        keys.update(names)
    return keys


def readme_commands(text: str) -> set[str]:
    """The commands of the ``qsup ...`` lines in the "## Use" section's first code block."""
    block = _code_blocks(_section(text, "## Use"))[0]
    words = [line.split()[1] for line in block.splitlines() if line.startswith("qsup ")]
    return {w for w in words if not w.startswith("-")}


def _compare(code: set[str], docs: set[str], what: str, code_where: str, docs_where: str) -> str:
    """One message naming what is missing where, both ways ("" when they agree)."""
    out = []
    if code - docs:
        out.append(f"{what} missing from {docs_where}: {', '.join(sorted(code - docs))}")
    if docs - code:
        out.append(f"{what} in {docs_where} missing from {code_where}: {', '.join(sorted(docs - code))}")
    return "; ".join(out)


def test_readme_config_table_matches_the_config_model():
    problems = _compare(set(Config.model_fields), readme_config_keys(README.read_text()), "config keys",
                        "supervisor/_config.py's Config", "README.md's node-config table (### Node config)")
    assert not problems, problems


def test_readme_command_list_matches_the_cli():
    commands = {name for name, cmd in main.commands.items() if not cmd.hidden}
    problems = _compare(commands, readme_commands(README.read_text()), "qsup commands",
                        "the CLI (supervisor/_cli.py)", "README.md's command list (## Use)")
    assert not problems, problems


def _client_test_overrides() -> object:
    """``GENERATOR_CONFIG["content_type_overrides"]`` of integration/test_openapi_client.py, read
    without importing it (it needs the integration harness)."""
    tree = ast.parse((ROOT / "integration" / "test_openapi_client.py").read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(getattr(t, "id", None) == "GENERATOR_CONFIG" for t in node.targets)):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and key.value == "content_type_overrides":
                    return ast.literal_eval(value)
    raise AssertionError("integration/test_openapi_client.py has no GENERATOR_CONFIG['content_type_overrides']")


def test_readme_generator_command_uses_the_client_tests_override():
    section = _section(README.read_text(), "### A generated client")
    block = next((b for b in _code_blocks(section) if "openapi-python-client generate" in b), None)
    assert block is not None, "README.md's 'A generated client' has no openapi-python-client command"
    m = re.search(r"cat > (\S+) <<'?EOF'?\n(.*?)\nEOF\n", block, flags=re.S)
    assert m, "README.md's generator command writes no config file (cat > FILE <<'EOF' ... EOF)"
    config_file, config = m.group(1), json.loads(m.group(2))
    generate = next(line for line in block.splitlines() if "openapi-python-client generate" in line)
    assert f"--config {config_file}" in generate, f"README.md's generator command does not pass --config {config_file}"
    want = _client_test_overrides()
    assert config.get("content_type_overrides") == want, (
        f"README.md's generator config has content_type_overrides {config.get('content_type_overrides')!r}; "
        f"integration/test_openapi_client.py uses {want!r}")


def test_documented_modes_hook_phases_and_name_pattern_are_the_codes():
    readme = README.read_text()
    assert re.search(rf'^name = "vm1" +# {re.escape(NAME_PATTERN)}(;|$)', readme, flags=re.M), \
        f"README.md's spec example does not give the name pattern {NAME_PATTERN}"
    assert f"Peer names follow node names (`{NAME_PATTERN}`)" in readme, \
        f"README.md's peer names do not give the name pattern {NAME_PATTERN}"
    hooks = (ROOT / "examples" / "hooks" / "README.md").read_text()
    modes = re.search(r'^mode = "routed" +# (.*)$', readme, flags=re.M)
    assert modes, "README.md's spec example has no mode comment"
    assert tuple(m.strip() for m in modes.group(1).split("|")) == netconf.MODES, \
        f"README.md's spec example lists modes {modes.group(1)!r}, netconf has {netconf.MODES}"
    phases = re.search(r"`PHASE`\s*\(`([a-z|-]+)`\)", readme)
    assert phases and tuple(phases.group(1).split("|")) == netconf.REASONS, \
        f"README.md's hook PHASE values differ from netconf.REASONS {netconf.REASONS}"
    rows = {m.group(1): tuple(re.findall(r"`([a-z-]+)`", m.group(2)))
            for m in re.finditer(r"^\| `([A-Z_]+)` +\|([^|]*)\|", hooks, flags=re.M)}
    assert rows.get("MODE") == netconf.MODES, \
        f"examples/hooks/README.md's MODE row says {rows.get('MODE')}, netconf has {netconf.MODES}"
    assert rows.get("PHASE") == netconf.REASONS, \
        f"examples/hooks/README.md's PHASE row says {rows.get('PHASE')}, netconf has {netconf.REASONS}"
