"""Who may open the page: anyone on this machine (127.0.0.1), or whoever has the token.

Binding another host is explicit (``--host``) and then every HTTP request needs the token,
given once as ``?token=...`` (kept in a cookie for the page's own requests and websocket).
"""

from __future__ import annotations

import hmac
import secrets

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
COOKIE = "medlora_token"


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_middleware(token: str):
    """An aiohttp middleware refusing requests without the token (query or cookie)."""
    from aiohttp import web

    @web.middleware
    async def check(request, handler):
        given = request.query.get("token")
        if given is not None and hmac.compare_digest(given, token):
            response = await handler(request)
            if hasattr(response, "set_cookie"):
                response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
            return response
        if hmac.compare_digest(request.cookies.get(COOKIE, ""), token):
            return await handler(request)
        return web.Response(status=403, text="medlora web: open the address printed at start (it holds the token).")

    return check
