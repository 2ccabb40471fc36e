"""The HTTP filters of Atlas's Envoy bootstrap, as the JSON its template inlines: ext_authz's
service block, the per-request ext_proc filters behind their matchers, json_to_metadata for
usage, the Lua filter of `splice` streams, and the gRPC access log that settles them
(`atlas.envoy_config.render` puts them in `envoy/atlas.yaml.tmpl`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from atlas.grant import (
    ATLAS_HEADER_PREFIX,
    AUTHZ_NAMESPACE,
    DEGRADED_HEADER,
    EXTPROC_NAMESPACE,
    GRANT_HEADER,
    KEY_ID_HEADER,
    PRIORITY_HEADER,
    PROC_HEADER,
    PROVIDER_HEADER,
    USAGE_NAMESPACE,
    ProcMode,
)
from atlas.limits import ENVOY_HEADROOM_BYTES

if TYPE_CHECKING:
    from atlas.envoy_config import EnvoyParams


def _patterns(*exact: str, prefix: tuple[str, ...] = ()) -> dict[str, object]:
    return {"patterns": [{"exact": e} for e in exact] + [{"prefix": p} for p in prefix]}


def authz_service(protocol: str, timeout: str) -> dict[str, object]:
    """ext_authz's service block. Over HTTP the grant and headers cross as HTTP headers:

    - to authz: every request header (authz strips any `x-atlas-*` a client sent, and finds
      the key in any of its spellings), under `/check` (authz's own paths are outside it);
    - to the upstream: who, at what priority, the upstream credential;
    - to the client: `x-ratelimit-*` on success; a refusal's own headers;
    - to dynamic metadata (string values, namespace envoy.filters.http.ext_authz): the grant
      for extproc, the ext_proc configuration for Envoy's matchers (`x-atlas-proc`) and the
      key id for the access log."""
    if protocol == "grpc":
        return {"grpc_service": {"envoy_grpc": {"cluster_name": "atlas_authz"}, "timeout": timeout}}
    return {
        "http_service": {
            "server_uri": {
                "uri": "http://atlas-authz",
                "cluster": "atlas_authz",
                "timeout": timeout,
            },
            "path_prefix": "/check",
            "authorization_response": {
                # A provider's credential rides in its wire API's header (atlas/providers).
                "allowed_upstream_headers": _patterns(
                    KEY_ID_HEADER,
                    PRIORITY_HEADER,
                    PROVIDER_HEADER,
                    "authorization",
                    "x-api-key",
                    "x-goog-api-key",
                ),
                "allowed_client_headers": _patterns(
                    "content-type",
                    "retry-after",
                    "retry-after-ms",
                    prefix=("x-ratelimit-", ATLAS_HEADER_PREFIX),
                ),
                "allowed_client_headers_on_success": _patterns(
                    DEGRADED_HEADER, prefix=("x-ratelimit-",)
                ),
                "dynamic_metadata_from_headers": _patterns(
                    GRANT_HEADER, KEY_ID_HEADER, PROC_HEADER, PROVIDER_HEADER
                ),
            },
        }
    }


#: ext_proc's processing mode per configuration (atlas.grant.ProcMode); modes not listed are
#: SEND for headers and NONE for bodies.
_PROC_MODES: dict[str, dict[str, str]] = {
    ProcMode.REWRITE: {
        "request_header_mode": "SKIP",
        "request_body_mode": "BUFFERED",  # extproc fixes Content-Length when it rewrites
        "response_header_mode": "SKIP",
        "response_body_mode": "STREAMED",
    },
    ProcMode.OBSERVE: {
        "request_header_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "STREAMED",
    },
    ProcMode.JSON: {
        "request_header_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "STREAMED",
    },
}
# No configuration sends the response headers: a round trip before the first byte that
# says nothing the grant (a stream or not) and the body (SSE, or a JSON answer: an error is
# refunded) do not. Bodies are STREAMED: their size is unknown without the headers, and
# BUFFERED over Envoy's buffer limit would fail the response; a small body still arrives as
# one message.
#: The filter names (also the keys of per-route `disabled` configs).
PROC_FILTER_NAMES = {
    ProcMode.REWRITE: "envoy.filters.http.ext_proc",
    ProcMode.OBSERVE: "atlas.ext_proc.observe",
    ProcMode.JSON: "atlas.ext_proc.json",
}
_SKIP = {
    "action": {
        "name": "skip",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3"
            ".SkipFilter"
        },
    }
}


def _proc_is(value_match: dict[str, object], *, invert: bool = False) -> dict[str, object]:
    """A predicate on authz's `x-atlas-proc` dynamic metadata. Stream info is there from the
    start, so it decides on a local reply too (whose request headers never reached these
    filters: a request-header matcher could not decide there, and the filter would run)."""
    return {
        "single_predicate": {
            "input": {
                "name": "proc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs"
                    ".network.v3.DynamicMetadataInput",
                    "filter": AUTHZ_NAMESPACE,
                    "path": [{"key": PROC_HEADER}],
                },
            },
            "custom_match": {
                "name": "proc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.input_matchers"
                    ".metadata.v3.Metadata",
                    "value": value_match,
                    "invert": invert,
                },
            },
        }
    }


def _skipped_when(
    name: str, config: Mapping[str, object], skips: Sequence[object]
) -> dict[str, object]:
    """The filter `name` with `config`, wrapped in an ExtensionWithMatcher that skips it when
    any of `skips` matches."""
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {"name": name, "typed_config": config},
            "xds_matcher": {
                "matcher_list": {"matchers": [{"predicate": p, "on_match": _SKIP} for p in skips]}
            },
        },
    }


#: The json_to_metadata filter, named as the namespace it writes usage into (the contract's
#: USAGE_NAMESPACE, which extproc/accesslog.py reads).
USAGE_FILTER_NAME = USAGE_NAMESPACE
SSE_USAGE_FILTER_NAME = "envoy.filters.http.sse_to_metadata"
#: Fields of `usage` lifted, each under its dotted path as the key (a detail object the
#: response lacks, or a null, writes nothing: json_to_metadata takes it as missing).
USAGE_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "prompt_tokens_details.cached_tokens",
    "completion_tokens_details.reasoning_tokens",
    "input_tokens_details.cached_tokens",
    "output_tokens_details.reasoning_tokens",
)


#: The fields an `sse` stream (chat, completions) reports usage in.
SSE_USAGE_FIELDS = tuple(f for f in USAGE_FIELDS if not f.startswith(("input", "output")))


def _small_response(params: EnvoyParams) -> dict[str, object]:
    """A predicate: the response has a Content-Length json_to_metadata can buffer (it holds the
    whole body, and a body over Envoy's buffer limit would fail the response with a 500)."""
    limit = params.max_request_bytes + ENVOY_HEADROOM_BYTES  # the connection buffer limit
    digits = len(str(limit)) - 1  # every number of fewer digits is below the limit
    return {
        "single_predicate": {
            "input": {
                "name": "length",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.type.matcher.v3"
                    ".HttpResponseHeaderMatchInput",
                    "header_name": "content-length",
                },
            },
            "value_match": {"safe_regex": {"google_re2": {}, "regex": f"^[0-9]{{1,{digits}}}$"}},
        }
    }


def usage_filter(params: EnvoyParams) -> dict[str, object]:
    """json_to_metadata lifting a `json` exchange's `usage` into dynamic metadata for the
    access log; `read` says it saw the whole body (JSON or not)."""

    read = {"metadata_namespace": USAGE_NAMESPACE, "key": "read", "value": {"number_value": 1}}
    config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3"
        ".JsonToMetadata",
        "response_rules": {
            "rules": [
                *(_usage_rule(f) for f in USAGE_FIELDS),
                {
                    "selectors": [{"key": "object"}],
                    "on_present": read,
                    "on_missing": read,
                    "on_error": read,
                },
            ],
            "allow_content_types_regex": {"regex": "^application/json"},
            "allow_empty_content_type": True,
        },
    }
    skips = [
        _proc_is({"string_match": {"exact": ProcMode.JSON}}, invert=True),
        {"not_matcher": _small_response(params)},
    ]
    return _skipped_when(USAGE_FILTER_NAME, config, skips)


def _usage_rule(field: str) -> dict[str, object]:
    """A json_to_metadata rule: `usage.<field>` as a number under `field` in atlas.usage."""
    return {
        "selectors": [{"key": k} for k in ("usage", *field.split("."))],
        "on_present": {"metadata_namespace": USAGE_NAMESPACE, "key": field, "type": "NUMBER"},
    }


def sse_usage_filter() -> dict[str, object]:
    """sse_to_metadata (Envoy 1.40, work in progress) lifting an `sse` stream's usage with the
    same rules: each event's JSON is read, the last `usage` kept (the earlier chunks' `null`
    writes nothing), for the access log (docs/envoy-notes.md, issue 12)."""
    parser = {
        "@type": "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser",
        # Chat and completions streams only (ProcMode.SSE): their names, not Responses'.
        "rules": [{"rule": _usage_rule(f)} for f in SSE_USAGE_FIELDS],
    }
    config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3"
        ".SseToMetadata",
        "response_rules": {
            "content_parser": {"name": "envoy.content_parsers.json", "typed_config": parser},
            # An event over it is skipped, not failed: a big tool-call chunk is never usage.
            "max_event_size": 65536,
        },
    }
    skip = _proc_is({"string_match": {"exact": ProcMode.SSE}}, invert=True)
    return _skipped_when(SSE_USAGE_FILTER_NAME, config, [skip])


SPLICE_FILTER_NAME = "atlas.stream_splice"
#: The exchanges access-log settlement carries (ProcMode.JSON, ProcMode.SPLICE).
_LOGGED_MODES = f"^(?:{ProcMode.JSON}|{ProcMode.SPLICE})$"


def splice_filter(envoy_dir: Path) -> dict[str, object]:
    """Envoy's Lua filter running `envoy_dir`/stream_splice.lua for `splice` streams only: it
    adds `include_usage` to the request, cuts the usage chunk out of the response and lifts
    its usage into atlas.usage for the access log (docs/envoy-notes.md, issue 12)."""
    config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": (envoy_dir / "stream_splice.lua").read_text()},
    }
    skip = _proc_is({"string_match": {"exact": ProcMode.SPLICE}}, invert=True)
    return _skipped_when(SPLICE_FILTER_NAME, config, [skip])


def settlement_access_log(params: EnvoyParams) -> dict[str, object]:
    """The gRPC access log to extproc: many entries per message on one long-lived stream,
    flushed every 50 ms. It carries `json`, `splice` and `sse` exchanges (settled from it)
    and every exchange authz sent to a provider (what the provider answered: cooling, health)."""

    def logged(key: str, value: dict[str, object]) -> dict[str, object]:
        matcher = {"filter": AUTHZ_NAMESPACE, "path": [{"key": key}], "value": value}
        return {"metadata_filter": {"matcher": matcher}}

    wanted = [
        *(
            [logged(PROC_HEADER, {"string_match": {"safe_regex": {"regex": _LOGGED_MODES}}})]
            if params.access_log_settlement
            else []
        ),
        *(
            [logged(PROC_HEADER, {"string_match": {"exact": ProcMode.SSE}})]
            if params.sse_usage
            else []
        ),
        *(
            [logged(PROVIDER_HEADER, {"present_match": True})]
            if params.providers is not None
            else []
        ),
    ]
    common: dict[str, object] = {
        "log_name": "atlas-settlements",
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": "atlas_extproc"}},
        "buffer_flush_interval": "0.05s",
        "buffer_size_bytes": 16384,
    }
    config: dict[str, object] = {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3"
        ".HttpGrpcAccessLogConfig",
        "common_config": common,
    }
    if params.providers is not None:
        config["additional_response_headers_to_log"] = ["retry-after"]
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": wanted[0] if len(wanted) == 1 else {"or_filter": {"filters": wanted}},
        "typed_config": config,
    }


def ext_proc_filters(params: EnvoyParams) -> list[dict[str, object]]:
    """One ext_proc filter per configuration, each behind a matcher on x-atlas-proc."""
    filters: list[dict[str, object]] = []
    for mode, name in PROC_FILTER_NAMES.items():
        pm = {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
            **_PROC_MODES[mode],
        }
        if mode == ProcMode.REWRITE and params.model_routes:
            # Envoy 1.40 re-matches routes after a body response's header mutation only when it
            # sent the request headers (tests/e2e/test_model_routing.py: with them skipped,
            # requests stayed on the default route); extproc answers them with no override.
            pm["request_header_mode"] = "SEND"
        ext_proc = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3"
            ".ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "atlas_extproc"}},
            "failure_mode_allow": params.extproc_failure_mode_allow,
            "message_timeout": params.extproc_message_timeout,
            "max_message_timeout": "10s",
            "allow_mode_override": True,  # extproc picks BUFFERED (JSON) or STREAMED (SSE)
            "processing_mode": pm,
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [AUTHZ_NAMESPACE]},
                "receiving_namespaces": {"untyped": [EXTPROC_NAMESPACE]},
            },
            # RETAIN: never re-route after ext_authz approved the route. With model routes,
            # DEFAULT: extproc may re-route only between /v1/ routes (same ext_authz config).
            "route_cache_action": "DEFAULT" if params.model_routes else "RETAIN",
        }
        if mode == ProcMode.REWRITE:
            # Run it for `rewrite` and any unknown value; skip it without a grant (a refusal,
            # or nothing admitted) and for the values the others serve.
            served = (
                *PROC_FILTER_NAMES,
                ProcMode.NONE,
                *([ProcMode.SSE] * params.sse_usage),
                *([ProcMode.SPLICE] * params.access_log_settlement),
            )
            others = "|".join(m for m in served if m != mode)
            skips = [
                _proc_is({"present_match": True}, invert=True),
                _proc_is({"string_match": {"safe_regex": {"regex": f"^(?:{others})$"}}}),
            ]
        else:
            # Run it only for its own value.
            skips = [_proc_is({"string_match": {"exact": mode}}, invert=True)]
            if mode == ProcMode.JSON and params.access_log_settlement:
                # json_to_metadata reads a response it can buffer; this filter the others.
                skips.append(_small_response(params))
        filters.append(_skipped_when(name, ext_proc, skips))
    return filters
