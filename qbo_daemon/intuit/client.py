"""The Intuit OAuth 2.0 client: wire format, strict parsing, failure classes.

Every answer is parsed strictly into a :class:`TokenResult` or one of the
:mod:`qbo_daemon.core.errors` Intuit errors, so the caller never stores a token
from an error body (node-quickbooks 171) and always knows whether retrying
can help:

- ``invalid_grant`` -> :class:`InvalidGrantError` (the user must reconnect);
- ``invalid_client`` / ``unauthorized_client`` / HTTP 401 ->
  :class:`InvalidClientError` (our credentials are wrong, for every account);
- everything else -> :class:`TransientIntuitError`: connection errors,
  timeouts, 5xx, 429, 3xx (never followed: it would carry the credentials
  and the refresh token elsewhere), an HTML or malformed body, a 200 without
  a token, an unexpected 4xx. Giving up on a connection is only ever decided
  by ``invalid_grant``.

A 200 whose body is an OAuth error (``{"error": ...}``, no access token) is
classified by that error, as if it had come with a 400.

Every value in an answer is read by :mod:`qbo_daemon.intuit.parse`: numbers
are ASCII digits, lifetimes are clamped to what Intuit documents, words are
printable ASCII, and nothing it reads can raise. A 200 whose tokens are sound
is accepted whatever its lifetimes say: the refresh token in it may be a
rotated one, and the old may already be dead. Garbled lifetimes read as
absent (the refresh token's) or as five minutes (the access token's), with a
warning; out-of-range ones are clamped.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, quote_plus, urlencode, urljoin, urlsplit

import aiohttp
import structlog

from qbo_daemon.config.load import IntuitConfig
from qbo_daemon.core.clock import Clock
from qbo_daemon.core.errors import (
    IntuitError,
    InvalidClientError,
    InvalidGrantError,
    TransientIntuitError,
)
from qbo_daemon.core.models import (
    DEFAULT_ACCESS_TOKEN_LIFETIME,
    DEFAULT_REFRESH_TOKEN_LIFETIME,
    TokenSet,
)
from qbo_daemon.intuit import parse

log = structlog.get_logger("qbo_daemon.intuit.client")
# The access token's assumed life when Intuit's expires_in cannot be read.
_GARBLED_ACCESS_LIFETIME = timedelta(minutes=5)

# Asks Intuit to include x_refresh_token_hard_expires_in (the 5-year limit, 2025).
HARD_EXPIRY_HEADER = "x-include-refresh-token-hard-expires-in"


@dataclass(frozen=True, slots=True)
class TokenResult:
    tokens: TokenSet
    intuit_tid: str | None


class IntuitClient:
    """Talks to Intuit's authorization, token and revocation endpoints.

    One ``aiohttp.ClientSession`` for the whole process arrives by constructor;
    every call has its own explicit timeout (the session default is 5 minutes).
    """

    def __init__(self, session: aiohttp.ClientSession, config: IntuitConfig, clock: Clock) -> None:
        self._session = session
        self.config = config
        self._clock = clock
        self._basic_of: IntuitConfig | None = None  # the configuration _basic_value is of
        self._basic_value = ""

    def authorization_url(self, state: str, *, code_challenge: str | None = None) -> str:
        """Intuit's consent page for ``state``; with a PKCE S256 ``code_challenge`` if given."""
        params = {
            "client_id": self.config.client_id,
            "response_type": "code",
            "scope": " ".join(self.config.scopes),
            "redirect_uri": self.config.redirect_uri,
            "state": state,
        }
        if code_challenge is not None:
            params["code_challenge"] = code_challenge
            params["code_challenge_method"] = "S256"
        query = urlencode(params, quote_via=quote)
        separator = "&" if "?" in self.config.authorization_endpoint else "?"
        return f"{self.config.authorization_endpoint}{separator}{query}"

    async def exchange_code(self, code: str, *, code_verifier: str | None = None) -> TokenResult:
        """Trade an authorization code (single use) for a token set; PKCE's verifier if any.

        The one call with no second chance (a failure sends the user back to
        start), so a connection dropped before any answer is tried once more.
        """
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.config.redirect_uri,
        }
        if code_verifier is not None:
            form["code_verifier"] = code_verifier
        return await self._token_call(form, previous_refresh_token=None, again_if_dropped=True)

    async def refresh(self, refresh_token: str) -> TokenResult:
        """Refresh; the answer's refresh token, or ``refresh_token`` when it has none."""
        return await self._token_call(
            {"grant_type": "refresh_token", "refresh_token": refresh_token},
            previous_refresh_token=refresh_token,
        )

    async def revoke(self, token: str) -> str | None:
        """Revoke a refresh (or access) token; returns Intuit's ``intuit_tid``.

        Intuit documents a JSON body; RFC 7009 a form. A server that refuses the
        JSON one as a bad request (:func:`_body_refused`) is asked once more with
        the form. Any 2xx is success (RFC 7009 says 200; a 204 revoked the token
        just as well).
        """
        reply = await self._post_revoke("application/json", json.dumps({"token": token}).encode())
        if _body_refused(reply.status, reply.body):
            reply = await self._post_revoke(
                "application/x-www-form-urlencoded", urlencode({"token": token}).encode()
            )
        if 200 <= reply.status < 300:
            return reply.tid
        raise _classify(reply, what="revoke", conceal=self._concealed(token))

    async def _post_revoke(self, content_type: str, data: bytes) -> _Reply:
        headers = self._headers()
        headers["Content-Type"] = content_type
        return await self._post(self.config.revocation_endpoint, headers, data)

    async def _token_call(
        self,
        form: dict[str, str],
        *,
        previous_refresh_token: str | None,
        again_if_dropped: bool = False,
    ) -> TokenResult:
        obtained_at = self._clock.now()
        headers = self._headers()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        headers[HARD_EXPIRY_HEADER] = "true"
        reply = await self._post(
            self.config.token_endpoint,
            headers,
            urlencode(form).encode(),
            again_if_dropped=again_if_dropped,
        )
        data = parse.json_object(reply.body) if reply.status == 200 else None
        if reply.status != 200 or _is_error(data):
            conceal = self._concealed(form.get("refresh_token") or form.get("code"))
            raise _classify(reply, what="token", conceal=conceal)
        return TokenResult(
            tokens=_parse_tokens(data, reply.tid, obtained_at, previous_refresh_token),
            intuit_tid=reply.tid,
        )

    def _headers(self) -> dict[str, str]:
        return {"Authorization": "Basic " + self._basic(), "Accept": "application/json"}

    def _basic(self) -> str:
        """RFC 6749 §2.3.1: id and secret are form-encoded, then joined and base64-encoded.

        Intuit's ids and secrets are letters and digits, which the encoding leaves
        as they are; a secret with ``:``, ``%`` or ``+`` reaches a standard server
        intact only this way. Made once per configuration (a reload replaces it).
        """
        config = self.config
        if self._basic_of is not config:
            client_id = quote_plus(config.client_id, safe="")
            secret = quote_plus(config.client_secret.reveal(), safe="")
            self._basic_value = base64.b64encode(f"{client_id}:{secret}".encode()).decode("ascii")
            self._basic_of = config
        return self._basic_value

    def _concealed(self, presented: str | None) -> tuple[str, ...]:
        """What a server echoing our request must not get into an error message."""
        secret = self.config.client_secret.reveal()
        values = [secret, quote_plus(secret, safe=""), self._basic()]
        if presented:
            values += [presented, quote_plus(presented, safe="")]
        # Longest first, so a value is never half-replaced by a shorter one inside it.
        return tuple(sorted(filter(None, set(values)), key=len, reverse=True))

    async def _post(
        self, url: str, headers: dict[str, str], data: bytes, *, again_if_dropped: bool = False
    ) -> _Reply:
        seconds = self.config.timeout.total_seconds()
        try:
            if not again_if_dropped:
                # One try: the request's own timeout (aiohttp's total) bounds it.
                return await self._send(url, headers, data, seconds)
            async with asyncio.timeout(seconds):  # both tries together
                try:
                    return await self._send(url, headers, data, seconds)
                except _Dropped:
                    # RFC 9112 §9.3.1: a server may close an idle keep-alive connection
                    # just as we reuse it; the request got no answer. Sending a code
                    # again is no risk: had it been taken, the second try is refused
                    # (invalid_grant), which is where not trying would leave the user.
                    log.info("intuit.connection_dropped", detail="sent again on a new connection")
                    return await self._send(url, headers, data, seconds)
        except TimeoutError:
            raise TransientIntuitError(
                f"Intuit did not answer within {seconds:g}s", code="timeout"
            ) from None
        except (aiohttp.ClientError, _Dropped) as exc:
            cause = exc.cause if isinstance(exc, _Dropped) else exc
            raise TransientIntuitError(
                f"cannot reach Intuit: {type(cause).__name__}: {parse.text(str(cause))}",
                code="connection_error",
            ) from None

    async def _send(self, url: str, headers: dict[str, str], data: bytes, seconds: float) -> _Reply:
        timeout = _timeout(seconds)
        try:
            # Redirects are never followed: they would carry the Basic credentials
            # and the refresh token or code to wherever the Location points.
            response = await self._session.post(
                url, data=data, headers=headers, timeout=timeout, allow_redirects=False
            )
        except aiohttp.ClientConnectorError:
            raise  # no connection at all: nothing was sent, nothing to send again
        except (
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError,
            aiohttp.ClientConnectionResetError,
        ) as exc:
            raise _Dropped(exc) from None
        async with response:
            tid = parse.intuit_tid(response.headers.get("intuit_tid"))
            body = await _read_body(response, tid)
            return _Reply(
                status=response.status,
                body=body,
                tid=tid,
                retry_after=parse.retry_after(
                    response.headers.get("Retry-After"), self._clock.now()
                ),
                redirect=_origin(url, response.headers.get("Location"))
                if 300 <= response.status < 400
                else None,
            )


@functools.lru_cache(maxsize=8)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    """A request's timeout: ``seconds`` in all (immutable, so made once per value)."""
    return aiohttp.ClientTimeout(total=seconds)


class _Dropped(Exception):
    """The connection closed before any answer came (see ``IntuitClient._post``)."""

    def __init__(self, cause: aiohttp.ClientError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes
    tid: str | None
    retry_after: float | None
    redirect: str | None  # the origin a 3xx points to (never followed)


def _origin(url: str, location: str | None) -> str | None:
    """``scheme://host[:port]`` of a redirect's target: no path, query or user info."""
    if not location:
        return None
    try:
        target = urlsplit(urljoin(url, location))
        host, port = target.hostname, target.port
    except ValueError:
        return None
    if not target.scheme or not host:
        return None
    origin = f"{target.scheme}://{host}" + (f":{port}" if port else "")
    return parse.text(origin, limit=120)


async def _read_body(response: aiohttp.ClientResponse, tid: str | None) -> bytes:
    """The answer's body, refused past :data:`parse.MAX_BODY_BYTES` (no one reads a gigabyte)."""
    length = response.content_length
    if (
        length is not None
        and length <= parse.MAX_BODY_BYTES
        and "Transfer-Encoding" not in response.headers
        and response.headers.get("Content-Encoding", "identity").strip().lower() == "identity"
    ):
        # Framed by its Content-Length and not compressed: it cannot grow past it.
        return await response.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > parse.MAX_BODY_BYTES:
            raise TransientIntuitError(
                f"Intuit answered HTTP {response.status} with a body over "
                f"{parse.MAX_BODY_BYTES} bytes",
                status=response.status,
                code="body_too_large",
                intuit_tid=tid,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_tokens(
    data: dict[str, Any] | None,
    tid: str | None,
    obtained_at: datetime,
    previous_refresh_token: str | None,
) -> TokenSet:
    """The token set of a 200 answer's body (``data``: as :func:`parse.json_object` read it)."""
    if data is None:
        raise TransientIntuitError(
            "Intuit answered 200 with a body that is not a JSON object",
            status=200,
            code="malformed_body",
            intuit_tid=tid,
        )
    access_token = parse.token(data.get("access_token"))
    if access_token is None:
        raise TransientIntuitError(
            "Intuit answered 200 without a usable access_token",
            status=200,
            code="no_access_token",
            intuit_tid=tid,
        )
    refresh_token = parse.token(data.get("refresh_token"))
    if refresh_token is None:
        if data.get("refresh_token") not in (None, ""):
            # Not a token Intuit could have issued (a space, a control character, a
            # lone surrogate): read as absent, as a garbled lifetime is.
            log.warning(
                "intuit.field_ignored", field="refresh_token", intuit_tid=tid, detail="ignored"
            )
        if previous_refresh_token is None:
            raise TransientIntuitError(
                "Intuit answered the code exchange without a refresh_token",
                status=200,
                code="no_refresh_token",
                intuit_tid=tid,
            )
        # Keep the token we presented: Intuit rotates only every day or so.
        refresh_token = previous_refresh_token
    if "expires_in" in data:
        # Garbled, it still must not throw away a rotated refresh token: assume a short
        # life, so the next refresh (which brings a sound one) comes soon.
        expires_in = (
            _lifetime(data, "expires_in", parse.ACCESS_TOKEN_MAX_LIFETIME, tid)
            or _GARBLED_ACCESS_LIFETIME
        )
    else:
        expires_in = DEFAULT_ACCESS_TOKEN_LIFETIME
    # The refresh token's lifetimes are advisory: a garbled one must not throw away
    # a rotated refresh token (the old one may already be dead), so it reads as absent.
    refresh_in = (
        _lifetime(data, "x_refresh_token_expires_in", parse.REFRESH_TOKEN_MAX_LIFETIME, tid)
        or DEFAULT_REFRESH_TOKEN_LIFETIME
    )
    hard_in = _lifetime(
        data, "x_refresh_token_hard_expires_in", parse.HARD_EXPIRY_MAX_LIFETIME, tid
    )
    return TokenSet(
        access_token=access_token,
        refresh_token=refresh_token,
        obtained_at=obtained_at,
        token_expires_at=parse.after(obtained_at, expires_in.total_seconds()),
        refresh_token_expires_at=parse.after(obtained_at, refresh_in.total_seconds()),
        refresh_token_hard_expires_at=(
            parse.after(obtained_at, hard_in.total_seconds()) if hard_in is not None else None
        ),
    )


def _lifetime(
    data: dict[str, Any], field: str, maximum: timedelta, tid: str | None
) -> timedelta | None:
    """A lifetime field, clamped to ``maximum``; ``None`` when absent or garbled (logged)."""
    value = data.get(field)
    if value is None:
        return None
    life = parse.lifetime(value, maximum)
    if life is None:
        log.warning("intuit.field_ignored", field=field, intuit_tid=tid, detail="taken as absent")
    return life


def _body_refused(status: int, body: bytes) -> bool:
    """The revocation server did not take our JSON body (an RFC 7009 one wants a form).

    415, or 400 without an error code or with ``invalid_request`` (RFC 7009's
    answer to a request without ``token``). A 400 naming the token
    (``invalid_grant``, ``unsupported_token_type``) read it: asking again won't help.
    """
    if status == 415:
        return True
    if status != 400:
        return False
    data = parse.json_object(body)
    code = parse.error_code(data.get("error")) if data else None
    return code in (None, "invalid_request")


def _is_error(data: dict[str, Any] | None) -> bool:
    """A 200 whose body (``data``) is an OAuth error (``error``) and carries no access token.

    Some servers answer an error with 200; its ``error`` decides as on a 400.
    """
    return data is not None and "error" in data and parse.token(data.get("access_token")) is None


def _classify(reply: _Reply, *, what: str, conceal: tuple[str, ...] = ()) -> IntuitError:
    status, body, tid = reply.status, reply.body, reply.tid
    data = parse.json_object(body)
    code = parse.error_code(data.get("error")) if data else None
    description = data.get("error_description") if data else None
    if isinstance(description, str):
        # A server (or a proxy) may echo what it was sent: never repeat a token, a
        # code, the client secret or the Basic credentials.
        for value in conceal:
            description = description.replace(value, "[redacted]")
    detail = f": {parse.text(description)}" if isinstance(description, str) and description else ""
    if code == "invalid_grant":
        return InvalidGrantError(
            f"Intuit refused the grant (invalid_grant{detail})",
            status=status,
            code=code,
            intuit_tid=tid,
        )
    if code in ("invalid_client", "unauthorized_client") or status == 401:
        return InvalidClientError(
            f"Intuit refused our client credentials ({code or f'HTTP {status}'}{detail}); "
            "check [intuit] client_id and client_secret",
            status=status,
            code=code or "invalid_client",
            intuit_tid=tid,
        )
    if 300 <= status < 400:
        where = f" to {reply.redirect}" if reply.redirect else ""
        key = "token_endpoint" if what == "token" else "revocation_endpoint"
        message = (
            f"Intuit {what} call answered HTTP {status}, a redirect{where} (not followed); "
            f"check [intuit] {key}"
        )
    elif data is None:
        kind = "an HTML page" if body.lstrip()[:1] == b"<" else "a body that is not JSON"
        message = f"Intuit {what} call answered HTTP {status} with {kind}"
    else:
        message = f"Intuit {what} call answered HTTP {status} ({code or 'no error code'}{detail})"
    return TransientIntuitError(
        message,
        status=status,
        code=code or f"http_{status}",
        intuit_tid=tid,
        retry_after=reply.retry_after,
    )


__all__ = ["HARD_EXPIRY_HEADER", "IntuitClient", "TokenResult"]
