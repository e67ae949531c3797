"""``GET /admin``: the admin page, a static HTML page whose script calls the admin and report APIs.

It sits beside the APIs it drives (``proxy.api.admin`` for the policy, its versions, diffs and
rollback; ``proxy.api.reports`` for the charts) and holds no data itself, so loading it needs
no key: the admin types a key into the page, which keeps it in ``sessionStorage`` and sends it
as a bearer token on each call, where the APIs check the role as they do for any client. The
page (``admin_page.html``, package data) is read once at import; its one inline script and one
inline style are allowed by their SHA-256 hashes in the Content-Security-Policy, which allows
nothing else: no other script, style, image, frame or form target, and connections to this
origin only.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

PATH = "/admin"


def _hash(page: str, tag: str) -> str:
    """The CSP source for the page's only ``<tag>`` element, by the hash of its exact text."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    if len(found) != 1:  # a second inline block would be refused by the browser: fail at import instead
        raise RuntimeError(f"admin_page.html must hold exactly one <{tag}> element, found {len(found)}")
    digest = hashlib.sha256(found[0].encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


_PAGE = resources.files("proxy.api").joinpath("admin_page.html").read_text(encoding="utf-8")
BODY = _PAGE.encode("utf-8")
CSP = (
    f"default-src 'none'; script-src {_hash(_PAGE, 'script')}; style-src {_hash(_PAGE, 'style')}; "
    "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


async def admin_page(request: web.Request) -> web.Response:
    return web.Response(body=BODY, headers=HEADERS)


def add_admin_page_route(app: web.Application) -> None:
    app.router.add_get(PATH, admin_page)
