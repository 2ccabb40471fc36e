"""Benchmark: bare Envoy vs Envoy + Atlas, side by side in one run, same load, same cores.

Run (from the checkout, with the project's virtualenv and Debian's `wrk` installed):

    make bench                         # = .venv/bin/python -m bench   (~7 minutes)
    python -m bench --quick            # short phases, ~2 minutes, noisier
    python -m bench --only nonstream   # or serial | stream | sse | authz | estimation
    python -m bench --duration 30 --connections 16 --output - --json /tmp/bench.json
    python -m bench --wait-quiet 120   # on a shared machine: start once others are idle

Options: --duration S (per phase and path; default 15, --quick 3), --rounds N (each phase is
cut into N slices alternating the paths, so drift or a disturbance hits both alike; default 3,
--quick 1), --serial-requests N (per path in the one-at-a-time phase; default 1000, --quick
300), --connections N (wrk, default 16), --authz-concurrency N, --upstreams N (demo
upstream processes sharing one port), --replicas N (authz/extproc processes), --output PATH
('-' for none), --json PATH (every raw measurement).

What it starts, on free 127.0.0.1 ports: one demo upstream (`python -m atlas.local.demo`);
a *bare* Envoy (`envoy/bare.yaml.tmpl`: same binary, listener, route and timeouts as Atlas's
bootstrap, no ext_authz/ext_proc) with one worker; and the Atlas stack (`atlas.local.stack.Stack`:
Valkey, authz, extproc, admin, Envoy with one worker) pointed at the SAME upstream, with one API
key (made through the admin REST API) whose limits cannot be reached; and the *floor*: Atlas's
own Envoy bootstrap (rendered by `atlas.envoy_config.render`, HTTP ext_authz) in front of
do-nothing authz and ext_proc servers (`bench/floor.py`), the design's cost with none of
Atlas's logic. Everything is stopped at the end, also on errors and Ctrl-C.

What it compares (each phase once per path, one after the other):

0. one plain completion at a time over one keep-alive connection (`bench/loadgen.py serial`)
   on bare, floor and Atlas: the added latency on a quiet machine, p50 and p99;
1. the upstream alone under wrk, to show it is not the bottleneck (its req/s and CPU);
2. non-streaming maximum throughput: wrk, `max_tokens` 16 (bare, floor, Atlas);
3. latency at half of Atlas's maximum: an open-loop fixed-rate generator (`bench/loadgen.py`)
   at 50% of the Atlas req/s from (2), on bare and Atlas;
4. streaming maximum throughput: wrk, `stream: true`, 64 tokens (the upstream sends the events
   back to back);
5. paced streams: 8 connections, the upstream pausing 1 ms between events so each chunk is its
   own message through Envoy and extproc: time to first byte and extproc CPU per chunk;
   then the same with a single connection (bare, floor, Atlas): time to first byte, quiet;
6. authz alone: concurrent Checks against the stack's authz (with Valkey), over the protocol
   its Envoy uses (HTTP ext_authz by default, gRPC with `ATLAS_AUTHZ_PROTOCOL=grpc`);
7. streams whose client asks for usage (`stream_options.include_usage`): (4) and both (5) on
   bare, Atlas (the `observe` ext_proc filter) and a second Atlas stack, started for these
   phases only, with the opt-in `ATLAS_STREAM_USAGE_FROM_ENVOY=true` (Envoy's sse_to_metadata
   reads the usage, the access log settles it: no ext_proc).

CPU of every process comes from /proc before and after each phase. Any error (socket error,
non-2xx, Envoy ext_authz/ext_proc failure, incomplete stream) stops the run with exit code 1:
numbers from a failing run are not reported.

How to read the output (printed, and written to docs/benchmarks.md with machine and command):

* "Summary against the targets": each target of the performance issue, the measured value,
  and met / not met with the distance (ratio to the target).
* "added by Atlas" rows are Atlas minus bare Envoy at the same load; "Atlas − floor" is what
  Atlas's own logic adds over do-nothing servers in the same transports; "vs bare" is the
  throughput ratio. Latencies are milliseconds; p50/p99 are percentiles of all requests.
* "proxy CPU / req" is Envoy + authz + extproc + Valkey + admin CPU per request; "client" is
  the load generator, "harness" this process. On a 2-core machine everything competes for the
  same cores, so total CPU per request is what bounds throughput.
* "Bottlenecks" names any process at (or near) a full core in the maximum-load phases: a
  single-threaded Python service at 100% of a core is the limit of its path.
"""

import sys

from bench.run import main

sys.exit(main())
