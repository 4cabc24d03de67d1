"""Who may call what: the caller's role, and the one check every request passes (issue 16).

Roles (``scope["qsup.role"]``, set by ``_asgi._Outer`` before anything else looks at the request):

* ``operator`` -- the unix socket (its file mode is the access control), the bearer token on the
  TCP listener, or a client certificate whose name the config lists in ``operators``: every route.
* ``peer <name>`` -- a client certificate naming a declared peer (a key of ``[peers]``): only its
  own part of a live migration *to* this node -- prepare an incoming from itself, and show,
  abort, confirm the release of and recover the incomings it prepared.  Nothing else.
* a client certificate that names neither (signed by ``tls_ca``, but nobody this node knows)
  has no role: 403 on every route, known or not.

Which operation admits which role is one table, ``_routes.ACCESS`` (by operationId, next to the
routes; the OpenAPI document states it on every operation as ``x-qsup-roles``).  :class:`Authorizer`
matches a request to its route once, before Starlette routes it, and answers 403 ``forbidden``
naming the role and the route.  The prepare handler adds one check the route cannot make without
the body: a peer may name no other ``source`` than itself (:func:`incoming_source`).

The node a peer prepared an incoming for is kept on the incoming (``IncomingMigration.source``,
in the instance's migration record, so it survives a daemon restart).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.routing import Match, Route

from ._errors import ErrorKind, HttpError

#: the ASGI scope key of the caller's :class:`Role`
ROLE_KEY = "qsup.role"
#: the ASGI scope key of the name a verified client certificate carries (set by the TLS listener's
#: layer, ``supervisor._daemon.PeerAuth``); absent: no certificate
CERT_KEY = "qsup.cert_name"


@dataclass(frozen=True)
class Role:
    """``kind`` ``operator``, ``peer`` (``name``: the declared peer) or ``unknown`` (``name``: the
    certificate's name, neither a peer nor an operator)."""

    kind: str
    name: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.kind == "operator"

    @property
    def is_peer(self) -> bool:
        return self.kind == "peer"

    def __str__(self) -> str:
        if self.kind == "operator":
            return "operator"
        if self.kind == "peer":
            return f"peer {self.name}"
        return f"certificate {str(self.name)[:80]!r} (neither a declared peer nor in operators)"


OPERATOR = Role("operator")


def role_for_certificate(name: str, peers: Iterable[str], operators: Iterable[str]) -> Role:
    """The role of a verified client certificate that names ``name``."""
    if name in peers:
        return Role("peer", name)
    if name in operators:
        return OPERATOR
    return Role("unknown", name)


def role_of(scope: Mapping[str, Any]) -> Role:
    """The caller's role; none set (a request that did not pass ``_Outer``) is no role."""
    role = scope.get(ROLE_KEY)
    return role if isinstance(role, Role) else Role("unknown", None)


class Access(enum.Enum):
    """Who may call an operation.  The operator may call every one."""

    #: the operator only
    OPERATOR = "operator"
    #: the operator; a peer too, for an incoming migration from itself (the body's ``source``)
    PEER_PREPARE = "peer-prepare"
    #: the operator; the peer that prepared the incoming migration ``{name}``
    PEER_INCOMING = "peer-incoming"

    @property
    def roles(self) -> list[str]:
        """``x-qsup-roles``: the roles that may call it."""
        return ["operator"] if self is Access.OPERATOR else ["operator", "peer"]

    @property
    def sentence(self) -> str:
        """The OpenAPI description's sentence about it."""
        return {
            Access.OPERATOR: "Roles: operator only (the unix socket, the bearer token, a certificate in "
                             "`operators`); a peer gets 403.",
            Access.PEER_PREPARE: "Roles: operator, or a declared peer preparing an incoming migration from itself "
                                 "(`source` absent or its own name).",
            Access.PEER_INCOMING: "Roles: operator, or the declared peer that prepared this incoming migration.",
        }[self]


def prepared_by(inst: object) -> str | None:
    """The peer that prepared ``inst`` as an incoming migration (None: not one, or the operator's)."""
    m = getattr(inst, "migration", None)
    if getattr(m, "direction", None) != "in":
        return None
    source = getattr(m, "source", None)
    return source if isinstance(source, str) else None


def forbidden(role: Role, method: str, path: str, why: str = "", field: str | None = None) -> HttpError:
    return HttpError(f"{role} may not {method[:20]} {path[:200]}{why}", field, kind=ErrorKind.FORBIDDEN)


class Authorizer:
    """The table ``access`` (operationId -> :class:`Access`) over ``routes``, matched once per request."""

    def __init__(self, routes: Iterable[Route], access: Mapping[str, Access]):
        self.routes: list[tuple[Route, dict[str, Access]]] = []
        for route in routes:
            ops = getattr(route, "ops", {})
            table = {method: access[op.operation["operationId"]] for method, op in ops.items()}
            if "GET" in table:
                table.setdefault("HEAD", table["GET"])
            self.routes.append((route, table))

    def refusal(self, role: Role, scope: Mapping[str, Any], node: object) -> HttpError | None:
        """None if ``role`` may make this request, else its 403 answer."""
        if role.is_operator:
            return None
        method, path = str(scope.get("method", "")), str(scope.get("path", ""))
        if role.is_peer:
            for route, table in self.routes:
                match, child = route.matches(dict(scope))
                if match is not Match.FULL:
                    continue
                access = table.get(method, Access.OPERATOR)
                if access is Access.PEER_PREPARE:
                    return None
                if access is Access.PEER_INCOMING:
                    name = child.get("path_params", {}).get("name")
                    inst = getattr(node, "instances", {}).get(name)
                    if inst is not None and prepared_by(inst) == role.name:
                        return None
                    return forbidden(role, method, path, " (not an incoming migration it prepared)")
                break
        return forbidden(role, method, path)


def incoming_source(role: Role, named: str | None, peers: Iterable[str]) -> str | None:
    """Whose incoming migration a prepare makes: the peer that may drive it (None: the operator only).

    A peer prepares from itself only (``named`` absent or its own name; anything else is 403 naming
    ``source``); the operator may name a declared peer, to let that peer drive it.
    """
    if role.is_peer:
        if named is not None and named != role.name:
            raise forbidden(role, "POST", "/v1/migrations/incoming", f" from {named[:80]!r}: only from itself",
                            "source")
        return role.name
    if not role.is_operator:  # _Outer refused it already; never reached
        raise forbidden(role, "POST", "/v1/migrations/incoming")
    if named is not None and named not in peers:
        declared = ", ".join(sorted(peers)) or "none"
        raise HttpError(f"source: {named[:80]!r} is not a declared peer (the config's [peers]: {declared[:400]})",
                        "source", kind=ErrorKind.INVALID_SPEC)
    return named
