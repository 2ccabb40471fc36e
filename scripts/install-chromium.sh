#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for the dashboard's browser test.
#
# The test drives /usr/bin/chromium over the DevTools protocol; Debian's package is the only
# browser build we can install here (a browser download of its own, e.g. Playwright's, is not
# reachable). Safe to call before every test run: it does nothing when Chromium is present,
# and it never fails the build when it cannot install (the browser test then skips).
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
  echo "install-chromium: $CHROMIUM is present ($("$CHROMIUM" --version 2>/dev/null || echo '?'))"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-chromium: $CHROMIUM is missing and we are not root; skipping" \
    "(as root: apt-get install -y --no-install-recommends chromium)" >&2
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: $CHROMIUM is missing and apt-get is not available; skipping" >&2
  exit 0
fi

echo "install-chromium: apt-get update"
apt-get update -q
echo "install-chromium: apt-get install -y --no-install-recommends chromium"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
echo "install-chromium: installed $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
