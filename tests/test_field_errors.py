"""Errors that name a field share one base, :class:`supervisor._errors.FieldError`, with one argument
order: ``(message, field=None)``, then the subclass's own by keyword.  The HTTP API's error table
reads the field from the base.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from supervisor._client import RequestFailed
from supervisor._errors import FieldError, describe
from supervisor._instance import StartError
from supervisor._jail import JailError
from supervisor._migration import MigrationError
from supervisor._node import Conflict, NotFound
from supervisor._spec import SpecError
from supervisor._tls import TlsError
from supervisor.api._errors import ErrorKind, HttpError, http_error

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [SpecError, StartError, MigrationError, Conflict, NotFound, TlsError, JailError, HttpError, RequestFailed]
#: the subclass's own arguments, by keyword
EXTRA = {MigrationError: {"status": 409}, HttpError: {"kind": ErrorKind.CONFLICT}, RequestFailed: {"status": 409}}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_one_base_one_argument_order(cls):
    assert issubclass(cls, FieldError)
    params = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in params[:2]] == ["message", "field"], params
    assert all(p.kind is p.KEYWORD_ONLY for p in params[2:]), params
    e = cls("it is wrong", "nics[0].link", **EXTRA.get(cls, {}))
    assert (e.message, e.field) == ("it is wrong", "nics[0].link")
    assert str(e) == ("nics[0].link: it is wrong" if cls.field_in_text else "it is wrong")
    assert describe(e) == str(e)  # a sentence already: no type in front


def test_the_fixed_and_absent_fields():
    assert Conflict("taken").field == "name" and str(Conflict("taken")) == "name: taken"
    assert NotFound("no instance named 'x'").field == "name" and str(NotFound("no instance named 'x'")) \
        == "no instance named 'x'"
    assert isinstance(NotFound("gone"), KeyError) and isinstance(SpecError("bad"), ValueError)
    assert JailError("no").field == "qemu_chroot" and str(JailError("no")) == "qemu_chroot: no"
    assert SpecError("bad").field is None and str(SpecError("bad")) == "bad"
    # the client does not repeat a field the server's message already starts with
    assert str(RequestFailed("name: taken", "name", status=409)) == "name: taken"
    assert str(RequestFailed("taken", "name", status=409)) == "name: taken"


@pytest.mark.parametrize("cls", [SpecError, StartError, MigrationError, Conflict, NotFound], ids=lambda c: c.__name__)
def test_the_error_table_takes_the_field_from_the_base(cls):
    e = http_error(cls("it is wrong", "nics[0].link", **EXTRA.get(cls, {})))
    assert e.field == "nics[0].link" and e.message.endswith(str(cls("it is wrong", "nics[0].link",
                                                                        **EXTRA.get(cls, {}))))
    nested = http_error(cls("it is wrong", "nics[0].link", **EXTRA.get(cls, {})), field_prefix="spec")
    assert nested.field == "spec.nics[0].link"


def _text_of(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return None


def test_no_call_uses_the_old_order():
    """Over supervisor/, tests/ and integration/: no ``SpecError("", ...)`` (the old "no field"), no
    sentence where the field goes (fields have no spaces), at most two positional arguments."""
    names = {c.__name__ for c in CLASSES} | {"MissingImage"}  # a SpecError
    bad = []
    for path in [*ROOT.glob("supervisor/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("integration/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in names):
                continue
            first = _text_of(node.args[0]) if node.args else None
            second = _text_of(node.args[1]) if len(node.args) > 1 else None
            if len(node.args) > 2 or first == "" or (second is not None and " " in second):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad
