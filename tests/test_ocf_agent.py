"""contrib/ocf/qsup's validate-all, run with sh (no cluster, no daemon): migrate_options.

The agent pastes migrate_options into the migrate request's JSON, so every word is checked
first (issue 16): integers only after --max-bandwidth/--downtime-limit, stop|pause after
--switchover, --postcopy alone, nothing else.  The request itself is checked against a
scripted daemon in integration/cluster/test_agent.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parent.parent / "contrib" / "ocf" / "qsup"
OCF_ERR_CONFIGURED = 6

pytestmark = pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")


def validate(tmp_path: Path, options: str) -> subprocess.CompletedProcess:
    spec = tmp_path / "g1.json"
    spec.write_text(json.dumps({"name": "g1", "memory": 64}))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OCF_ROOT": str(tmp_path / "no-ocf"),
           "OCF_RESOURCE_INSTANCE": "g1", "OCF_RESKEY_spec": str(spec), "OCF_RESKEY_qsup": "/bin/true",
           "OCF_RESKEY_curl": "/bin/true", "OCF_RESKEY_migrate_options": options}
    return subprocess.run(["sh", str(AGENT), "validate-all"], env=env, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)


@pytest.mark.parametrize("options", [
    "", "--postcopy", "--max-bandwidth 100000000 --downtime-limit 300 --switchover stop",
    "--switchover pause --max-bandwidth 0 --postcopy", "  --downtime-limit   1  "])
def test_valid_migrate_options_pass(tmp_path, options):
    r = validate(tmp_path, options)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("options, says", [
    ('--max-bandwidth 1,"uri":"exec:touch/tmp/pwned"', "--max-bandwidth takes"),
    ("--max-bandwidth 1e9", "--max-bandwidth takes"),
    ("--downtime-limit 0300", "--downtime-limit takes"),
    ("--downtime-limit -1", "--downtime-limit takes"),
    ("--downtime-limit 1234567890123456789012", "--downtime-limit takes"),
    ("--switchover now", "--switchover takes"),
    ("--switchover 1", "--switchover takes"),
    ("--max-bandwidth", "--max-bandwidth needs a value"),
    ("--max-bandwidth --postcopy", "--max-bandwidth takes"),
    ("300", "'300' is not"),
    ("stop", "'stop' is not"),
    ("--to evil", "'--to' is not"),
    ("--postcopy=1", "'--postcopy=1' is not"),
])
def test_bad_migrate_options_are_refused_naming_the_word(tmp_path, options, says):
    r = validate(tmp_path, options)
    assert r.returncode == OCF_ERR_CONFIGURED, (r.returncode, r.stderr)
    assert "migrate_options: " in r.stderr and says in r.stderr, r.stderr


def test_a_glob_in_migrate_options_is_not_expanded(tmp_path):
    (tmp_path / "123").touch()  # "1*" would expand to this file's name in the agent's cwd
    r = validate(tmp_path, "--max-bandwidth 1*")
    assert r.returncode == OCF_ERR_CONFIGURED, r.stderr
