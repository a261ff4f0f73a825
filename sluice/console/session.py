"""The console's login: who a request is, from an encrypted session cookie, and the CSRF token
of its forms.

Rules:

1. With no keys configured (``sluice serve`` without ``--auth-file``) every visitor is admin,
   as on the API, and there is no login.
2. Otherwise the login form takes an API key and checks it against the gateway's key ring; a
   valid key is kept in the session, an encrypted cookie (Fernet) that is HttpOnly and
   SameSite=Strict, never in a URL. Every request checks the kept key against the key ring
   again, so a key that is taken out of the keys file stops working at once.
3. The session's secret is ``SLUICE_UI_SECRET`` (any string; give every gateway process of a
   deployment the same one so that a session made by one is read by the others), else a
   random one per process: sessions then end when the process does.
4. Every form that changes something (POST) carries the session's CSRF token; a POST without
   it, or with another one, is refused (403). SameSite=Strict already keeps other sites'
   forms from carrying the cookie; the token also covers the login form (login CSRF).
5. A page asked for without a valid session is redirected to the login form (303); the live
   event stream and the forms answer 401.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp_session import Session, get_session, new_session
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from sluice.gateway.auth import ADMIN, Principal

if TYPE_CHECKING:
    from sluice.gateway.app import Gateway

SECRET_ENV = "SLUICE_UI_SECRET"
COOKIE_NAME = "sluice_ui"
SESSION_MAX_AGE_S = 12 * 3600
KEY = "key"
CSRF = "csrf"


def storage() -> EncryptedCookieStorage:
    """The session cookie's storage (rules 2 and 3)."""
    secret = os.environ.get(SECRET_ENV)
    raw = (hashlib.sha256(secret.encode()).digest() if secret
           else secrets.token_bytes(32))
    return EncryptedCookieStorage(raw, cookie_name=COOKIE_NAME, httponly=True,
                                  samesite="Strict", max_age=SESSION_MAX_AGE_S, path="/ui")


def _gateway(request: web.Request) -> Gateway:
    from sluice.gateway.app import GATEWAY

    return request.config_dict[GATEWAY]


async def principal(request: web.Request) -> Principal | None:
    """Who the request is (rules 1 and 2); None: nobody logged in, or a key no longer valid."""
    keys = _gateway(request).keys
    if keys is None:
        return ADMIN
    session = await get_session(request)
    key = session.get(KEY)
    if not isinstance(key, str):
        return None
    return keys.principal(f"Bearer {key}")


async def csrf_token(request: web.Request) -> str:
    """The session's CSRF token (made on first use; rule 4)."""
    session = await get_session(request)
    token = session.get(CSRF)
    if not isinstance(token, str):
        token = session[CSRF] = secrets.token_urlsafe(24)
    return token


async def csrf_ok(request: web.Request, sent: object) -> bool:
    session = await get_session(request)
    token = session.get(CSRF)
    return (isinstance(token, str) and isinstance(sent, str)
            and hmac.compare_digest(token.encode(), sent.encode()))


async def log_in(request: web.Request, key: str) -> Principal | None:
    """Check ``key``; when valid, keep it in a new session (a new CSRF token too)."""
    keys = _gateway(request).keys
    who = ADMIN if keys is None else keys.principal(f"Bearer {key.strip()}")
    if who is None:
        return None
    session: Session = await new_session(request)
    session[KEY] = key.strip()
    session[CSRF] = secrets.token_urlsafe(24)
    return who


async def forget(request: web.Request) -> None:
    """End the session (a log-out, or a key no longer valid: rule 2)."""
    session = await get_session(request)
    session.invalidate()
