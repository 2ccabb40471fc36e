"""The admin dashboard: one static page and its assets, shipped with the package.

The page holds no data, so these routes are public; every number on it comes from the admin
JSON API, which the page calls with the admin token the user enters (or passes once as
`#token=...`, which never reaches a server or a log).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"

# Only what the page needs to be: its own scripts, styles and API, nothing inline and
# nothing from elsewhere; a key name with markup in it cannot run, and the page cannot be
# framed to trick a signed-in admin.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Revalidate every load: after an upgrade the page and its script must match.
    "cache-control": "no-cache",
}
ASSET_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/dashboard")
async def dashboard_page() -> FileResponse:
    """The dashboard's HTML."""
    return FileResponse(
        DASHBOARD_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS
    )


def asset_path(name: str) -> Path | None:
    """The file for /dashboard/static/`name`, or None: only scripts, styles and icons inside
    the dashboard folder (no traversal out of it, no HTML, no READMEs)."""
    path = (DASHBOARD_DIR / name).resolve()
    if not path.is_relative_to(DASHBOARD_DIR) or path.suffix not in ASSET_TYPES:
        return None
    return path if path.is_file() else None


@router.get("/dashboard/static/{name:path}")
async def dashboard_asset(name: str) -> FileResponse:
    """A script, stylesheet or icon of the dashboard (the vendored uPlot among them)."""
    path = asset_path(name)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such dashboard asset")
    return FileResponse(path, media_type=ASSET_TYPES[path.suffix], headers=PAGE_HEADERS)
