"""qsup's HTTP API: the upper floor, built on the instance core and the node (never the reverse).

What the daemon, the CLI and the tests need; the modules behind it are private:

* ``_errors.py``: the one table of error answers (status, code), the error answer itself;
* ``_request.py``: the body (size, time, strict JSON), query parameters, the node and instance;
* ``_openapi.py``: routes that carry their OpenAPI operations, the component schemas, the document;
* ``_routes.py``: instances, events, health, capacity, metrics, ``/openapi.json``;
* ``_migration_routes.py``: live migration (prepare, migrate, cancel, release, recover, abort);
* ``_events.py``: ``GET /v1/events`` as NDJSON straight to ASGI;
* ``_authz.py``: the roles and the one access check (over ``_routes.ACCESS``);
* ``_asgi.py``: the Starlette app and the outermost layer (role, auth, limits, access log, metrics);
* ``_metrics.py``: Prometheus metrics.
"""

from ._asgi import HttpLimits, create_app, create_metrics_app
from ._metrics import Metrics
from ._routes import openapi

__all__ = ["HttpLimits", "Metrics", "create_app", "create_metrics_app", "openapi"]
