"""Records: names cannot escape, writes are atomic with tight modes."""

import os
import stat

import pytest

from supervisor._records import Layout, inside, read_json, write_json


def test_inside_refuses_escapes(tmp_path):
    assert inside(tmp_path, "a") == tmp_path / "a"
    for bad in ("..", "../x", "/etc", "a/../../x", ""):
        with pytest.raises(ValueError):
            inside(tmp_path, bad)


def test_write_json_is_atomic_and_private(tmp_path):
    lay = Layout(tmp_path / "state", tmp_path / "run")
    lay.prepare()
    d = lay.instance_dir("vm1")
    d.mkdir(mode=0o700)
    p = lay.record_path("vm1")
    write_json(p, {"a": 1})
    write_json(p, {"a": 2})
    assert read_json(p) == {"a": 2}
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(lay.state_dir).st_mode) == 0o700
    assert [x.name for x in d.iterdir()] == ["record.json"]  # no temp file left
    assert lay.recorded_instances() == ["vm1"]
    lay.remove_instance("vm1")
    assert lay.recorded_instances() == []
