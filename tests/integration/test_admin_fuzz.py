"""Property-based requests over the admin OpenAPI (schemathesis): no input gives a 5xx."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings

from admin.app import create_app
from atlas.settings import Settings
from tests.servers import start_valkey, stop

ADMIN = {"Authorization": "Bearer fuzz-admin-token"}
EXAMPLES_PER_OPERATION = 25


def test_no_input_gives_a_server_error(tmp_path: Path) -> None:
    proc, url = start_valkey(tmp_path)
    try:
        app = create_app(Settings(redis_url=url, admin_token="fuzz-admin-token"))
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        failures: list[str] = []
        # /healthz answers 503 by design here: authz and extproc are not running.
        operations = [
            op for op in (r.ok() for r in schema.get_all_operations()) if op.path != "/healthz"
        ]
        assert len(operations) >= 15
        for op in operations:

            @given(case=op.as_strategy())
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def call(case: schemathesis.Case) -> None:
                for headers in (ADMIN, {}):
                    response = case.call(headers=headers)
                    if response.status_code >= 500:
                        failures.append(
                            f"{case.method} {case.formatted_path} "
                            f"{response.status_code}: {response.text[:300]}"
                        )

            call()
        assert failures == [], "\n".join(failures)
    finally:
        stop(proc)
