"""Small pure helpers for exceptions that cross a nursery.

trio wraps what a child task raises in an exception group; an error
message or a decision ("was this only a cancellation?") must look at the
leaves, not at the group.
"""

from __future__ import annotations

import trio


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc`` (``exc`` itself if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def only_cancelled(exc: BaseException) -> bool:
    """True when ``exc`` is a cancellation (possibly grouped) and nothing else."""
    return all(isinstance(e, trio.Cancelled) for e in leaves(exc))


def root_cause(exc: BaseException) -> BaseException:
    """The first leaf that is not a cancellation (``exc`` if there is none)."""
    for e in leaves(exc):
        if not isinstance(e, trio.Cancelled):
            return e
    return exc


def describe(exc: BaseException) -> str:
    """One line for an error event: the root cause's own words.

    qsup's own errors (they carry a ``field``) are already sentences; anything
    else gets its type in front, so a bug reads as one.
    """
    e = root_cause(exc)
    text = " | ".join(p.strip() for p in str(e).splitlines() if p.strip()) or type(e).__name__
    return (text if hasattr(e, "field") else f"{type(e).__name__}: {text}") + hook_output(e)


def hook_output(exc: BaseException) -> str:
    """A failing hook's own words (netconf failures carry them): they belong in the error."""
    outputs = [f["output"].strip() for f in getattr(exc, "failures", None) or []
               if isinstance(f.get("output"), str) and f["output"].strip()]
    if not outputs:
        return ""
    return " -- output: " + " | ".join(o.replace("\n", " / ")[-500:] for o in outputs)
