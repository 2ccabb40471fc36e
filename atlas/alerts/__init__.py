"""Alerts before refusals: thresholds of quotas and budgets (`thresholds`), signed webhook
deliveries with retries (`delivery`), the loop in admin that evaluates changed scopes
(`alerter`)."""
