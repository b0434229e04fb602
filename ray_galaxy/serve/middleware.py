"""What of the HTTP API runs before routing: the bearer-token gate and the body-size limit.

The token is a property of the whole server, not of a route: every path but /healthz, also
/docs, unknown paths and a wrong method, answers 401 without it, and it is checked before a
byte of the body is read. A route dependency runs only after routing (404/405 first) and after
FastAPI has read the body, so the gate is an ASGI middleware; headers, cookies and the query
string are read through Starlette's :class:`~starlette.requests.Request`.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote, unquote

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ray_galaxy.serve.config import TOKEN_COOKIE, Token
from ray_galaxy.serve.errors import error_response

LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>ray-galaxy: token required</title></head>
<body style="font-family:sans-serif;background:#0b0e17;color:#dde;padding:3em">
<h1>ray-galaxy</h1><p>{message}</p>
<form method="get" action="{action}"><label>Token <input name="token" type="password" autofocus>
</label> <button>Open the explorer</button></form></body></html>"""


def relative_path(scope: Scope) -> str:
    """The request path below the application's route prefix."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _login_page(message: str, root: str, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(LOGIN_PAGE.format(message=message, action=html.escape(root + "/")),
                        status_code=401, headers=headers)


class TokenGate:
    """Bearer-token check on every route but /healthz (401 without or with a wrong token).

    A browser cannot put a bearer header on a page load or an ``<img>``, so the explorer page
    takes the token once as ``GET /?token=...``: the answer is a redirect that drops it from the
    address bar and stores it in an HttpOnly, SameSite=Strict cookie, which then stands in for
    the header (a cross-site page never gets it sent along).
    """

    def __init__(self, app: ASGIApp, token: Token) -> None:
        self.app, self.token = app, token

    def authorized(self, request: Request) -> bool:
        """A matching ``Authorization: Bearer`` header, else a matching explorer cookie."""
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and presented.strip():
            return self.token.matches(presented.strip())
        cookie = unquote(request.cookies.get(TOKEN_COOKIE, "").strip('"'))
        return bool(cookie) and self.token.matches(cookie)

    def _page_login(self, request: Request, root: str) -> Response:
        """``GET /?token=...``: the cookie and a redirect to the bare page, or the form again."""
        if not self.token.matches(request.query_params["token"]):
            return _login_page("That token is not valid.", root)
        resp = RedirectResponse(root + "/", status_code=303)
        resp.set_cookie(TOKEN_COOKIE, quote(self.token.value, safe=""), path=root or "/",
                        httponly=True, samesite="strict")
        return resp

    def _refusal(self, request: Request, page: bool, root: str) -> Response:
        if page and "text/html" in request.headers.get("accept", ""):
            return _login_page("This server needs its access token.", root, {"WWW-Authenticate": "Bearer"})
        message = "invalid bearer token" if request.headers.get("authorization") else "missing bearer token"
        return error_response(401, message, "authorization", {"WWW-Authenticate": "Bearer"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = relative_path(scope)
        if scope["type"] != "http" or path == "/healthz":
            return await self.app(scope, receive, send)
        request = Request(scope)
        root = scope.get("root_path", "") or ""
        page = path == "/" and request.method in ("GET", "HEAD")
        if page and "token" in request.query_params:
            return await self._page_login(request, root)(scope, receive, send)
        if self.authorized(request):
            return await self.app(scope, receive, send)
        return await self._refusal(request, page, root)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over ``limit`` bytes: by Content-Length, or counted while it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    def _declared_problem(self, scope: Scope) -> Response | None:
        declared = Request(scope).headers.get("content-length")
        if declared is None:
            return None
        try:
            size = int(declared)
        except ValueError:
            return error_response(400, "invalid Content-Length", "body")
        return self._too_large() if size > self.limit else None

    def _too_large(self) -> Response:
        return error_response(413, f"request body exceeds {self.limit} bytes", "body")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self._declared_problem(scope)
        if problem is not None:
            return await problem(scope, receive, send)
        seen, started = 0, False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large()(scope, receive, send)


def add_middleware(app: Any, token: Token | None, max_body_bytes: int) -> None:
    """The body limit, and outside it (checked first) the token gate when there is a token."""
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if token is not None:
        app.add_middleware(TokenGate, token=token)
