"""Local tooling, not the services: the stack `atlas up` and the tests run (`stack`), process
supervision and readiness probes (`procs`), free ports (`ports`), the demo upstream (`demo`)
and the history simulator (`simulate`). Tests and benchmarks reuse these instead of copying
them; nothing under `authz/`, `extproc/` or `admin/` imports this package."""
