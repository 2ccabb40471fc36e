"""Forecasting on `atlas simulate` history (pipelines over many keys' hours, per-model and
global prefixes) on the cluster ledger: `tests/integration/test_forecasting_api.py` again."""

from __future__ import annotations

from tests.cluster.conftest import reuse_tests
from tests.integration import test_forecasting_api
from tests.integration.test_forecasting_api import api as api  # the module's fixtures
from tests.integration.test_forecasting_api import simulated as simulated

globals().update(reuse_tests(test_forecasting_api))
