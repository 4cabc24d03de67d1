"""The base of every error that names a field, and small pure helpers for exceptions that cross a
nursery.

trio wraps what a child task raises in an exception group; an error
message or a decision ("was this only a cancellation?") must look at the
leaves, not at the group.

trio is imported where it is used, not here: the jail helper (``python -m supervisor._jail``, a
fresh process on every jailed start) imports this module for :class:`FieldError` and nothing else.
"""

from __future__ import annotations


class FieldError(Exception):
    """An error about one field of what a caller gave: a spec key, a config key, a body field.

    One argument order for all of them: ``(message, field=None)``, then anything of the subclass's
    own, by keyword.  ``field`` is dotted (``nics[0].link``) or None; ``message`` is the text
    without it; ``str(err)`` is one line with the field in front (``nics[0].link: no such
    bridge``), or the message alone where the subclass's messages stand on their own
    (``field_in_text = False``).  The HTTP API's error table reads ``field`` from here.
    """

    #: ``str(err)`` is ``"<field>: <message>"`` (when there is a field)
    field_in_text: bool = True

    def __init__(self, message: str, field: str | None = None) -> None:
        self.message = message
        self.field = field or None
        super().__init__(f"{self.field}: {message}" if self.field and self.field_in_text else message)

    def __str__(self) -> str:  # not KeyError's repr() for NotFound
        return str(self.args[0]) if self.args else ""


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc`` (``exc`` itself if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def only_cancelled(exc: BaseException) -> bool:
    """True when ``exc`` is a cancellation (possibly grouped) and nothing else."""
    import trio

    return all(isinstance(e, trio.Cancelled) for e in leaves(exc))


def root_cause(exc: BaseException) -> BaseException:
    """The first leaf that is not a cancellation (``exc`` if there is none)."""
    import trio

    for e in leaves(exc):
        if not isinstance(e, trio.Cancelled):
            return e
    return exc


def describe(exc: BaseException) -> str:
    """One line for an error event: the root cause's own words.

    qsup's own errors (:class:`FieldError`) are already sentences; anything
    else gets its type in front, so a bug reads as one.
    """
    e = root_cause(exc)
    text = " | ".join(p.strip() for p in str(e).splitlines() if p.strip()) or type(e).__name__
    return (text if isinstance(e, FieldError) else f"{type(e).__name__}: {text}") + hook_output(e)


def hook_output(exc: BaseException) -> str:
    """A failing hook's own words (netconf failures carry them): they belong in the error."""
    outputs = [f["output"].strip() for f in getattr(exc, "failures", None) or []
               if isinstance(f.get("output"), str) and f["output"].strip()]
    if not outputs:
        return ""
    return " -- output: " + " | ".join(o.replace("\n", " / ")[-500:] for o in outputs)
