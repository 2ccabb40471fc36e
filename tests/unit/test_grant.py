"""The authz -> extproc contract (atlas/grant.py): encoding and the ext_proc mode per exchange."""

from __future__ import annotations

import json
from dataclasses import replace

from atlas.grant import MAX_GRANT_MODEL_CHARS, Grant, ProcMode, proc_mode

BASE = Grant(key_id="key_1", reservation_id="r1", reserved=100, prompt_estimate=5, route="chat")


def test_a_grant_survives_a_header_and_hostile_text_decodes_to_none() -> None:
    g = BASE
    model = "llama\u00e9\n\x00" + "x" * 1000
    text = Grant(
        key_id="k", reservation_id="r", reserved=1, prompt_estimate=1, model=model
    ).encode()
    assert text.isascii() and all(" " <= c <= "~" for c in text)  # a valid header value
    back = Grant.decode(text)
    assert back is not None and back.model == model[:MAX_GRANT_MODEL_CHARS]
    assert Grant.decode(g.encode()) == g
    for bad in ("", "null", "[]", "{", '{"key_id": 5, "reservation_id": "r"}', "[" * 10_000):
        assert Grant.decode(bad) is None, bad
    # Numbers of the wrong kind count as 0; granted_completion <= 0 is "not clamped".
    odd = Grant.decode(
        json.dumps(
            {
                "key_id": "k",
                "reservation_id": "r",
                "reserved": True,
                "granted_completion": -1,
                "choices": 0,
            }
        )
    )
    assert odd is not None and odd.reserved == 0 and odd.granted_completion is None
    assert odd.choices == 1


def test_each_exchange_gets_the_ext_proc_configuration_it_needs() -> None:
    parsed = replace(BASE, body_parsed=True)
    cases = [
        (parsed, False, ProcMode.JSON),  # plain completion: authz read it all
        (replace(parsed, stream=True), False, ProcMode.REWRITE),  # include_usage injected
        (replace(parsed, stream=True, include_usage=True), False, ProcMode.OBSERVE),
        (replace(parsed, stream=True, route="responses"), False, ProcMode.OBSERVE),  # no injection
        (replace(parsed, granted_completion=9), False, ProcMode.REWRITE),  # clamp
        (replace(parsed, route="embeddings"), False, ProcMode.OBSERVE),
        (BASE, False, ProcMode.REWRITE),  # authz did not parse an LLM body: extproc reads it
        (replace(BASE, route="models"), False, ProcMode.OBSERVE),  # GET /v1/models: no body
        (parsed, True, ProcMode.REWRITE),  # routing by model reads the body
    ]
    for grant, by_model, mode in cases:
        assert proc_mode(grant, route_by_model=by_model) == mode, (grant, by_model)


def test_with_envoy_reading_stream_usage_only_a_client_asked_usage_stream_skips_ext_proc() -> None:
    stream = replace(BASE, body_parsed=True, stream=True)
    cases = [
        (replace(stream, include_usage=True), ProcMode.SSE),
        (stream, ProcMode.REWRITE),  # Atlas injects include_usage and strips the chunk
        (replace(stream, include_usage=True, continuous_usage=True), ProcMode.REWRITE),
        (replace(stream, include_usage=True, granted_completion=9), ProcMode.REWRITE),  # clamp
        (replace(stream, include_usage=True, idempotency="ab12"), ProcMode.OBSERVE),  # kept
        (replace(stream, include_usage=True, route="responses"), ProcMode.OBSERVE),
        (replace(stream, stream=False), ProcMode.JSON),
    ]
    for grant, mode in cases:
        assert proc_mode(grant, route_by_model=False, sse_usage=True) == mode, grant
    assert proc_mode(cases[0][0], route_by_model=True, sse_usage=True) == ProcMode.REWRITE


def test_a_stream_needing_only_include_usage_is_spliced_by_envoy_when_its_body_allows() -> None:
    stream = replace(BASE, body_parsed=True, stream=True)
    cases = [
        (stream, True, ProcMode.SPLICE),  # Envoy's Lua filter adds it and cuts the chunk
        (replace(stream, route="completions"), True, ProcMode.SPLICE),
        (stream, False, ProcMode.REWRITE),  # a body the script cannot append to
        (replace(stream, granted_completion=9), True, ProcMode.REWRITE),  # clamp: extproc
        (replace(stream, continuous_usage=True), True, ProcMode.REWRITE),  # vLLM's stats
        (replace(stream, idempotency="ab12"), True, ProcMode.REWRITE),  # its response is kept
        (replace(stream, include_usage=True), True, ProcMode.OBSERVE),  # nothing to add
        (replace(stream, route="responses"), True, ProcMode.OBSERVE),  # reports usage anyway
        (replace(stream, stream=False), True, ProcMode.JSON),
    ]
    for grant, spliceable, mode in cases:
        assert proc_mode(grant, route_by_model=False, splice=spliceable) == mode, grant
    assert proc_mode(stream, route_by_model=True, splice=True) == ProcMode.REWRITE
