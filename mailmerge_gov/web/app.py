"""The staff directory web application (ASGI), built by create_app() over the index of `directory index`.

Starlette, not a larger framework: the site is a handful of pages, a login form and a JSON API over one
SQLite file, so it needs no ORM, forms or validation layer; Starlette is small, and brings Jinja2
templates, static files, signed session cookies (itsdangerous) and a test client with it. uvicorn runs it
(`mailmerge-gov directory serve`).
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from pathlib import Path
from typing import Callable, Collection
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSON, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailmerge_gov.config import WEB_FIELDS, Config, LdapServer, SecretError, WebConfig, is_local_path
from mailmerge_gov.directory.search import Person, SearchError, index_path, search
from mailmerge_gov.web import catalogue
from mailmerge_gov.web.auth import LoginUnavailable, Throttle, authenticate
from mailmerge_gov.web.data import (Lookup, lookup, person, person_json, qr_svg, redact, unit_members, unit_tree,
                                    vcard)
from mailmerge_gov.web.openapi import OPENAPI
from mailmerge_gov.web.redirects import old_url_target, same_path

HERE = Path(__file__).resolve().parent
log = logging.getLogger("mailmerge_gov.web")
MAX_QUERY = 200  # search() reads no more than this either
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_FORM = 8192  # bytes of a login form: a user name, a password and two tokens
NO_UNIT = "-"  # the path of the page of officials in no unit of the tree (no unit code is "-")
MIN_SECRET = 32  # characters of the session secret: shorter ones can be guessed offline from a cookie

# Pages load nothing from elsewhere and run no inline script: the browser is told so.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; "
     b"base-uri 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class JSONResponse(_StarletteJSON):
    """JSON through orjson: the API's answers are most of the site's traffic, and the standard encoder is slower."""

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


class WebSetupError(Exception):
    """The site cannot start as configured (a session secret too short, say); the message says what to change."""


class _SecurityHeaders:
    """ASGI middleware that adds SECURITY_HEADERS to every response, and no-store to a logged-in official's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                if scope.get("session", {}).get("uid"):
                    # private fields were possibly shown: no shared cache, no back-button copy after logout
                    headers.append((b"cache-control", b"private, no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, sending if scope["type"] == "http" else send)


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", str(DEFAULT_LIMIT))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:  # "²".isdigit() is true
        raise HTTPException(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def _session(request: Request) -> dict:
    """The request's signed session, or an empty one when the site has no login."""
    return request.scope.get("session", {})


async def _read_form(request: Request) -> dict[str, str]:
    """Read a small urlencoded form; 413 once it is over MAX_FORM bytes, before the rest of it is read."""
    # request.body() would hold whatever a client sends in memory first, and a login form is a few hundred bytes
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise HTTPException(413)
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _local_path(value: str) -> str:
    """`value` if it is a path of this site, else "/": the login's `next` must not send people elsewhere."""
    return value if is_local_path(value) else "/"


def app_from_config(config: Config) -> Starlette:
    """The site as the consolidation file's [web] table and [target.directory] describe it; WebSetupError if not."""
    directory, secret = login_setup(config)
    return create_app(index_path(config.state_file), settings=config.web, directory=directory, session_secret=secret)


def login_setup(config: Config) -> tuple[LdapServer | None, str | None]:
    """The directory officials log in against and the session secret (both None: no login); WebSetupError if unusable."""
    settings = config.web
    target = config.target.directory
    directory = target.ldap if target is not None and target.kind == "ldap" else None
    secret = None
    if settings.session_secret is not None:
        if directory is None:
            raise WebSetupError(f"{config.path}: [web] names a session secret for the login, but officials log in "
                                "against the new LDAP directory and [target.directory] has no ldap_url")
        file = settings.session_secret.file
        if file is not None and file.exists() and file.stat().st_mode & 0o077:
            raise WebSetupError(f"session secret file {file} can be read by others: chmod 600 it")
        try:
            secret = settings.session_secret.reveal()
        except SecretError as exc:
            raise WebSetupError(f"the session secret cannot be read: {exc}") from None
        if len(secret) < MIN_SECRET:
            raise WebSetupError(f"the session secret has {len(secret)} characters; it needs at least {MIN_SECRET}")
        if not (directory.use_ssl or directory.starttls) and directory.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("officials' passwords go to %s without TLS: use ldaps:// or starttls = true", directory.url)
        if settings.public_url and not settings.trusted_proxies:
            # Published behind a reverse proxy, every visitor would seem to come from the proxy's address: a few
            # wrong passwords from anyone would then hold up the logins of everybody (the throttle is per address).
            log.warning("[web] public_url is set but trusted_proxies is empty: name the reverse proxy in "
                        "trusted_proxies, or the login throttle counts every visitor as the proxy")
    return directory, secret


def create_app(index: Path, *, settings: WebConfig | None = None, directory: LdapServer | None = None,
               session_secret: str | None = None, debug: bool = False) -> Starlette:
    """The web application over the search index at `index` (read on every request: a rebuild shows at once).

    Officials can log in (and then see the private fields) when both `directory` (the new LDAP directory)
    and `session_secret` are given; otherwise every visitor sees the public fields of `settings` only.
    """
    settings = settings or WebConfig()
    if session_secret is not None and len(session_secret) < MIN_SECRET:
        raise WebSetupError(f"the session secret has {len(session_secret)} characters; it needs at least {MIN_SECRET} "
                            "(for example: python3 -c 'import secrets; print(secrets.token_urlsafe(48))')")
    login_enabled = directory is not None and session_secret is not None
    public = tuple(settings.public_fields)
    default_lang = settings.default_language
    throttle = Throttle()
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                     autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True,
                                     lstrip_blocks=True)
    templates = Jinja2Templates(env=environment)

    def logged_in(scope: Scope) -> str | None:
        """The uid of the session's official, while they are an active official in the index; else None."""
        # The signed cookie lives for session_minutes and cannot be taken back: an official disabled since the
        # login is out of the next index, and from then on sees what anybody sees. Looked up once per request.
        if not login_enabled:
            return None
        if "mmg.uid" not in scope:
            uid = scope.get("session", {}).get("uid")
            scope["mmg.uid"] = uid if uid and person(index, uid) is not None else None
        return scope["mmg.uid"]

    def user(request: Request) -> str | None:
        return logged_in(request.scope)

    def fields(request: Request) -> Collection[str]:
        """What this visitor may see and search: everything once logged in, the public fields otherwise."""
        return WEB_FIELDS if user(request) else public

    def lang_of(request: Request) -> str:
        return catalogue.pick(request.query_params.get("lang"), default_lang)

    def csrf_token(request: Request) -> str:
        session = _session(request)
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        return session["csrf"]

    def page(request: Request, name: str, status: int = 200, **context) -> Response:
        lang = lang_of(request)

        def link(path: str, **params: str) -> str:
            """A link within the site that keeps the language chosen."""
            query = {k: v for k, v in params.items() if v} | ({"lang": lang} if lang != default_lang else {})
            return quote(path) + ("?" + urlencode(query) if query else "")

        other = "en" if lang == "vi" else "vi"
        switch = dict(request.query_params) | {"lang": other}
        here = request.url.path + ("?" + request.url.query if request.url.query else "")
        visible = fields(request)
        context = {"t": catalogue.TEXT[lang], "lang": lang, "default_lang": default_lang, "link": link,
                   "switch_url": request.url.path + "?" + urlencode(switch), "other_lang": other,
                   "login_enabled": login_enabled, "user": user(request), "here": here,
                   "hidden_fields": [f for f in WEB_FIELDS if f not in visible]} | context
        if login_enabled and (context["user"] or name == "login.html"):
            # the login form and the logout button carry it; other visitors get no cookie at all
            context["csrf"] = csrf_token(request)
        return templates.TemplateResponse(request, name, context, status_code=status)

    def official(request: Request) -> Person:
        """The official of the path's uid, with only what this visitor may see; 404 when there is none."""
        found = person(index, request.path_params["uid"])
        if found is None:
            raise HTTPException(404, "no active official has this uid")
        return redact(found, fields(request))

    async def search_page(request: Request) -> Response:
        query = request.query_params.get("q", "")[:MAX_QUERY]
        visible = fields(request)
        found = ([redact(p, visible) for p in search(index, query, DEFAULT_LIMIT, visible)]
                 if query.strip() else None)
        return page(request, "search.html", query=query, found=found)

    async def person_page(request: Request) -> Response:
        return page(request, "person.html", person=official(request))

    async def person_vcard(request: Request) -> Response:
        found = official(request)
        filename = re.sub(r"[^A-Za-z0-9._-]", "_", found.uid)  # never a quote or line break in the header
        return Response(vcard(found), media_type="text/vcard; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="{filename}.vcf"'})

    async def person_qr(request: Request) -> Response:
        return Response(qr_svg(vcard(official(request))), media_type="image/svg+xml")

    async def units_page(request: Request) -> Response:
        visible = fields(request)
        # Units and counts only; each unit's officials are on a page of their own (units_members_page).
        # Without the unit field, who works where is private: no links to those pages then.
        return page(request, "units.html", units=unit_tree(index), visible=visible)

    async def unit_page(request: Request) -> Response:
        visible = fields(request)
        code = request.path_params["code"]
        found = unit_members(index, "" if code == NO_UNIT else code) if "unit" in visible else None
        if found is None:
            raise HTTPException(404)
        unit, members = found
        return page(request, "unit.html", unit=unit, members=[redact(p, visible) for p in members], visible=visible)

    async def lookup_page(request: Request) -> Response:
        address = request.query_params.get("address", "")[:MAX_QUERY]
        visible = fields(request)
        result = lookup(index, address, visible) if address.strip() else None
        if result is not None and result.person is not None:
            result = Lookup(result.address, redact(result.person, visible), result.current)
        return page(request, "lookup.html", address=address, result=result,
                    invalid=bool(address.strip()) and result is None)

    async def login_page(request: Request) -> Response:
        if not login_enabled:
            raise HTTPException(404)
        if request.method == "GET":
            return page(request, "login.html", next=_local_path(request.query_params.get("next", "/")))
        form = await _read_form(request)
        session = _session(request)
        target = _local_path(form.get("next", "/"))
        username = form.get("username", "")[:256]
        expected = session.get("csrf", "")
        if not expected or not hmac.compare_digest(expected.encode(), form.get("csrf", "").encode()):
            # a form from another site, or one older than the session: not an attempt, ask again
            return page(request, "login.html", 403, next=target, username=username, error="login_expired")
        client = request.client.host if request.client else "?"
        keys = (f"ip:{client}", f"user:{username.strip().lower()}")
        if throttle.blocked(*keys):
            return page(request, "login.html", 429, next=target, username=username, error="login_throttled")
        try:
            uid = await run_in_threadpool(authenticate, directory, username, form.get("password", ""))
        except LoginUnavailable:
            return page(request, "login.html", 503, next=target, username=username, error="login_unavailable")
        if uid is None:
            throttle.failed(*keys)
            # one message for an unknown name, a wrong password and a disabled account alike
            return page(request, "login.html", 400, next=target, username=username, error="login_failed")
        throttle.succeeded(keys[1])
        session.clear()  # a new cookie, a new CSRF token: nothing carried over from before the login
        session["uid"] = uid
        session["csrf"] = secrets.token_urlsafe(32)
        return RedirectResponse(target, status_code=303)

    async def logout(request: Request) -> Response:
        if not login_enabled:
            raise HTTPException(404)
        form = await _read_form(request)
        session = _session(request)
        expected = session.get("csrf", "")
        if not expected or not hmac.compare_digest(expected.encode(), form.get("csrf", "").encode()):
            raise HTTPException(403)
        session.clear()
        return RedirectResponse(link_home(request), status_code=303)

    def link_home(request: Request) -> str:
        lang = lang_of(request)
        return "/" if lang == default_lang else "/?" + urlencode({"lang": lang})

    async def api_people(request: Request) -> Response:
        query = request.query_params.get("q", "")[:MAX_QUERY]
        visible = fields(request)
        # on the event loop, not in a thread: a search takes well under a millisecond, and the hop to a worker
        # thread doubled the p95 latency of scripts/bench_search.py (10 clients)
        found = search(index, query, _limit(request), visible) if query.strip() else []
        return JSONResponse({"query": query, "count": len(found),
                             "people": [person_json(p, visible) for p in found]})

    async def api_person(request: Request) -> Response:
        return JSONResponse(person_json(official(request), fields(request)))

    async def api_units(request: Request) -> Response:
        return JSONResponse({"units": [unit.as_json() for unit in unit_tree(index)]})

    async def api_lookup(request: Request) -> Response:
        visible = fields(request)
        result = lookup(index, request.query_params.get("address", "")[:MAX_QUERY], visible)
        if result is None:
            raise HTTPException(400, "address must be a whole mail address, e.g. name@hcm.gov.vn")
        return JSONResponse(result.as_json(visible))

    async def api_openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    def is_api(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if is_api(request):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        heading, text = {404: ("not_found_heading", "not_found"),
                         403: ("forbidden_heading", "forbidden")}.get(exc.status_code, ("bad_request", "bad_request"))
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
        Route("/units/{code}", unit_page),
        Route("/lookup", lookup_page),
        Route("/login", login_page, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/people", api_people),
        Route("/api/people/{uid}", api_person),
        Route("/api/units", api_units),
        Route("/api/lookup", api_lookup),
        Route("/api/openapi.json", api_openapi),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(debug=debug, routes=routes,
                    exception_handlers={HTTPException: http_error, SearchError: index_error})
    if settings.redirects:
        app.add_middleware(_OldUrls, index=index, settings=settings,
                           fields=lambda scope: WEB_FIELDS if logged_in(scope) else public)
    app.add_middleware(_SecurityHeaders)
    if login_enabled:
        # outermost, so the security headers see the session; the cookie: signed, HttpOnly, SameSite=Lax
        # (a link from a mail still arrives logged in), Secure and __Host- bound when the site is https
        app.add_middleware(SessionMiddleware, secret_key=session_secret,
                           session_cookie="__Host-mmg_session" if settings.secure_cookies else "mmg_session",
                           max_age=settings.session_minutes * 60, same_site="lax",
                           https_only=settings.secure_cookies)
    return app


class _OldUrls:
    """ASGI middleware: a GET of one of the old directory's URLs answers with the new page (301, or 302)."""

    def __init__(self, app: ASGIApp, index: Path, settings: WebConfig,
                 fields: Callable[[Scope], Collection[str]]) -> None:
        self.app = app
        self.index = index
        self.settings = settings
        self.fields = fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # only a GET of an old path goes further (to a thread: an address template reads the index)
        redirects = [redirect for redirect in self.settings.redirects if same_path(redirect.old_path, scope["path"])] \
            if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") else []
        if redirects:
            query = scope.get("query_string", b"").decode("latin-1")
            try:
                target = await run_in_threadpool(old_url_target, redirects, scope["path"], query,
                                                 self.index, self.fields(scope))
            except SearchError:
                target = None  # no index yet: the old URL is answered as any unknown page
            if target is not None:
                location, permanent = target
                await RedirectResponse(location, status_code=301 if permanent else 302)(scope, receive, send)
                return
        await self.app(scope, receive, send)
