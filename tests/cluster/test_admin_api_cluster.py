"""The admin REST API (keys, audit, usage, history, spend) on the cluster ledger: the
integration tests of `tests/integration/test_admin_api.py`, run again unchanged."""

from __future__ import annotations

from tests.cluster.conftest import reuse_tests
from tests.integration import test_admin_api
from tests.integration.conftest import api as api  # the admin API fixture

globals().update(reuse_tests(test_admin_api))
