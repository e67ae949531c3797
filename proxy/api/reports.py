"""``GET /v1/thrifty/reports``: the finance report over HTTP, for finance and admin keys.

Read-only. Takes the parameters of ``thrifty report`` (``since``, ``until``, ``period``,
``by=team,model``, ``format=json|csv|html|table``) and answers with the same renderings:
JSON by default, CSV as an attachment, HTML as a self-contained page. A key without the
finance or admin role gets 403; bad parameters get 400 naming the parameter, both in
OpenAI's error shape (raised here, mapped by the error middleware).
"""

from __future__ import annotations

from aiohttp import web

from proxy.api.middleware import REQUEST_ID
from proxy.app_state import GATEWAY
from proxy.cost.report_render import FORMATS, produce
from proxy.cost.reports import ReportError, make_query
from proxy.errors import BadRequest
from proxy.pipeline.auth import bearer_token

PATH = "/v1/thrifty/reports"
_PARAMS = ("since", "until", "period", "by", "format")
# The HTML page needs nothing from anywhere: no script at all, inline styles only.
_HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


async def get_report(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    token = bearer_token(request.headers.get("Authorization"), request.headers.get("x-api-key"))
    principal = await gateway.auth.authenticate(token)
    principal.require("finance", "admin")
    params = request.query
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise BadRequest(f"Unknown parameter {unknown[0]!r}; this endpoint takes {', '.join(_PARAMS)}.", param=unknown[0])
    fmt = params.get("format", "json")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}.", param="format")
    by = ",".join(params.getall("by")) if "by" in params else None
    try:
        query = make_query(since=params.get("since"), until=params.get("until"), period=params.get("period"), by=by, flag="")
    except ReportError as exc:
        raise BadRequest(str(exc), param=exc.param) from None
    output = await produce(gateway.db, query, fmt)
    headers = {"Content-Type": output.content_type, "Cache-Control": "no-store", "x-request-id": request[REQUEST_ID]}
    if fmt == "csv":
        headers["Content-Disposition"] = f'attachment; filename="{output.filename}"'
    elif fmt == "html":
        headers["Content-Security-Policy"] = _HTML_CSP
        headers["Content-Disposition"] = f'inline; filename="{output.filename}"'
    return web.Response(body=output.body.encode("utf-8"), headers=headers)


def add_report_routes(app: web.Application) -> None:
    app.router.add_get(PATH, get_report)
