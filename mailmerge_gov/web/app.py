"""The staff directory web application (ASGI), built by create_app() over the index of `directory index`.

Starlette, not a larger framework: the site is a handful of read-only pages and a JSON API over one
SQLite file, so it needs no ORM, forms or validation layer; Starlette is small, and brings Jinja2
templates, static files and a test client with it. uvicorn runs it (`mailmerge-gov directory serve`).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailmerge_gov.directory.search import SearchError, search
from mailmerge_gov.web import catalogue
from mailmerge_gov.web.data import lookup, person, person_json, qr_svg, unit_tree, vcard
from mailmerge_gov.web.openapi import OPENAPI

HERE = Path(__file__).resolve().parent
MAX_QUERY = 200  # search() reads no more than this either
DEFAULT_LIMIT = 20
MAX_LIMIT = 100

# Pages load nothing from elsewhere and run no inline script: the browser is told so.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; "
     b"base-uri 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class _SecurityHeaders:
    """ASGI middleware that adds SECURITY_HEADERS to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, sending if scope["type"] == "http" else send)


def _lang(request: Request) -> str:
    return catalogue.pick(request.query_params.get("lang"))


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", str(DEFAULT_LIMIT))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:  # "²".isdigit() is true
        raise HTTPException(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def create_app(index: Path, *, debug: bool = False) -> Starlette:
    """The web application over the search index at `index` (read on every request: a rebuild shows at once)."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                     autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True,
                                     lstrip_blocks=True)
    templates = Jinja2Templates(env=environment)

    def page(request: Request, name: str, status: int = 200, **context) -> Response:
        lang = _lang(request)

        def link(path: str, **params: str) -> str:
            """A link within the site that keeps the language chosen."""
            query = {k: v for k, v in params.items() if v} | ({"lang": lang} if lang != catalogue.DEFAULT else {})
            return quote(path) + ("?" + urlencode(query) if query else "")

        other = "en" if lang == "vi" else "vi"
        switch = dict(request.query_params) | {"lang": other}
        context |= {"t": catalogue.TEXT[lang], "lang": lang, "link": link,
                    "switch_url": request.url.path + "?" + urlencode(switch), "other_lang": other}
        return templates.TemplateResponse(request, name, context, status_code=status)

    async def search_page(request: Request) -> Response:
        query = request.query_params.get("q", "")[:MAX_QUERY]
        found = search(index, query, DEFAULT_LIMIT) if query.strip() else None
        return page(request, "search.html", query=query, found=found)

    async def person_page(request: Request) -> Response:
        official = person(index, request.path_params["uid"])
        if official is None:
            raise HTTPException(404)
        return page(request, "person.html", person=official)

    async def person_vcard(request: Request) -> Response:
        official = person(index, request.path_params["uid"])
        if official is None:
            raise HTTPException(404)
        filename = re.sub(r"[^A-Za-z0-9._-]", "_", official.uid)  # never a quote or line break in the header
        return Response(vcard(official), media_type="text/vcard; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="{filename}.vcf"'})

    async def person_qr(request: Request) -> Response:
        official = person(index, request.path_params["uid"])
        if official is None:
            raise HTTPException(404)
        return Response(qr_svg(vcard(official)), media_type="image/svg+xml")

    async def units_page(request: Request) -> Response:
        return page(request, "units.html", units=unit_tree(index))

    async def lookup_page(request: Request) -> Response:
        address = request.query_params.get("address", "")[:MAX_QUERY]
        result = lookup(index, address) if address.strip() else None
        return page(request, "lookup.html", address=address, result=result,
                    invalid=bool(address.strip()) and result is None)

    async def api_people(request: Request) -> Response:
        query = request.query_params.get("q", "")[:MAX_QUERY]
        found = search(index, query, _limit(request)) if query.strip() else []
        return JSONResponse({"query": query, "count": len(found), "people": [person_json(p) for p in found]})

    async def api_person(request: Request) -> Response:
        official = person(index, request.path_params["uid"])
        if official is None:
            raise HTTPException(404, "no active official has this uid")
        return JSONResponse(person_json(official))

    async def api_units(request: Request) -> Response:
        return JSONResponse({"units": [unit.as_json() for unit in unit_tree(index)]})

    async def api_lookup(request: Request) -> Response:
        result = lookup(index, request.query_params.get("address", "")[:MAX_QUERY])
        if result is None:
            raise HTTPException(400, "address must be a whole mail address, e.g. name@hcm.gov.vn")
        return JSONResponse(result.as_json())

    async def api_openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    def is_api(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if is_api(request):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        heading, text = (("not_found_heading", "not_found") if exc.status_code == 404
                         else ("bad_request", "bad_request"))
        return page(request, "error.html", exc.status_code, heading=heading, text=text)

    async def index_error(request: Request, exc: Exception) -> Response:
        # a missing or broken index: the service is there, its data is not (yet)
        if is_api(request):
            return JSONResponse({"error": "the search index is not available"}, status_code=503)
        return page(request, "error.html", 503, heading="unavailable_heading", text="unavailable")

    routes = [
        Route("/", search_page),
        Route("/people/{uid}", person_page),
        Route("/people/{uid}/vcard.vcf", person_vcard),
        Route("/people/{uid}/qr.svg", person_qr),
        Route("/units", units_page),
        Route("/lookup", lookup_page),
        Route("/api/people", api_people),
        Route("/api/people/{uid}", api_person),
        Route("/api/units", api_units),
        Route("/api/lookup", api_lookup),
        Route("/api/openapi.json", api_openapi),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(debug=debug, routes=routes,
                    exception_handlers={HTTPException: http_error, SearchError: index_error})
    app.add_middleware(_SecurityHeaders)
    return app
