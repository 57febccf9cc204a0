"""An independent OAuth 2.0 authorization server for tests, with switchable behaviours.

Written from RFC 6749 (OAuth 2.0), RFC 7009 (revocation) and Intuit's
documented wire format, sharing no code with :mod:`qbo_daemon.simulator`: a
behaviour where our client and our simulator agree with each other but not
with another server shows up here. Every behaviour is one a real server may
legitimately show (or one Intuit has shown): content types with and without
a charset, ``expires_in`` as a string, no ``token_type``, rotation on every
refresh or never, gzip, chunked, ``Connection: close``, HTTP/1.0, RFC 7009
form-encoded revocation, RFC 6749 §2.3.1 form-encoded Basic credentials,
errors as RFC 6749 §5.2 has them and as Intuit's outages do.

Two fronts share one model: an aiohttp app (the authorization, token and
revocation endpoints) and a bare TCP listener for the token endpoint that
writes its answers byte by byte (HTTP/1.0 with no length, an answer cut
off in the middle), which no HTTP framework would produce.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gzip
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = [
    "OMIT",
    "Answer",
    "Behaviour",
    "OAuthServer",
    "Rotation",
    "Seen",
    "Wire",
]

OMIT: Final = object()  # a field left out of the token answer
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_REALM: Final = 'Basic realm="independent-oauth"'
Rotation = Literal["always", "same", "omit"]
Wire = Literal["http10", "cut", "drop-reused"]


@dataclass(frozen=True)
class Answer:
    """One HTTP answer before framing."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @staticmethod
    def of_json(status: int, data: object, **headers: str) -> Answer:
        return Answer(
            status, json.dumps(data).encode(), {"Content-Type": "application/json", **headers}
        )

    @staticmethod
    def error(status: int, error: str, description: str | None = None, **headers: str) -> Answer:
        """An RFC 6749 §5.2 error answer."""
        data = {"error": error}
        if description is not None:
            data["error_description"] = description
        return Answer.of_json(status, data, **_NO_STORE, **headers)


@dataclass
class Behaviour:
    """What the server does; tests change it between calls."""

    # The token answer (RFC 6749 §5.1) and how it is labelled.
    content_type: str = "application/json"
    expires_in: object = 3600
    token_type: object = "bearer"
    x_refresh_token_expires_in: object = OMIT  # Intuit's; a standard server leaves it out
    extra: Mapping[str, object] = field(default_factory=dict)
    rotation: Rotation = "always"  # always a new one (the old dies) | the same value | none sent
    # Framing, on every answer of the aiohttp front.
    gzip: bool = False
    chunked: bool = False
    close: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering a token call
    wire: Wire | None = None  # the raw front's framing (None: HTTP/1.1, a length, close)
    # Client authentication (RFC 6749 §2.3.1). Credentials in the body are refused.
    basic_decoding: Literal["rfc6749", "raw"] = "rfc6749"
    # Canned answers the token endpoint gives instead of its own, one per call.
    token_answers: list[Answer] = field(default_factory=list)
    redirect_token_to: str | None = None  # the token endpoint answers 307 to this URL
    # Revocation: the body it reads, and its answer to a sound request.
    revocation_body: Literal["json", "form", "either"] = "either"
    revocation_answer: Answer = field(default_factory=lambda: Answer(200))
    # The redirect back to the client after consent.
    realm_param: str = "realmId"
    callback_extra: list[tuple[str, str]] = field(default_factory=list)
    code_prefix: str = "c-"  # codes are this plus url-safe base64
    deny: bool = False  # the user declines: error=access_denied


@dataclass(frozen=True)
class Seen:
    """One request as it arrived at an endpoint."""

    endpoint: str  # authorize | token | revoke
    method: str
    headers: CIMultiDictProxy[str]
    body: bytes
    answered: int

    def params(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))


@dataclass
class _Grant:
    realm_id: str
    refresh_token: str
    access_tokens: list[str] = field(default_factory=list)
    revoked: bool = False


class OAuthServer:
    """The server: ``start()`` it, point a client at its endpoints, read what it saw."""

    def __init__(
        self, client_id: str, client_secret: str, behaviour: Behaviour | None = None
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.behaviour = behaviour or Behaviour()
        self.seen: list[Seen] = []
        self.issued: list[str] = []  # every code and token handed out
        self.realm_id = str(9_130_000_000_000_000 + secrets.randbelow(10**15))
        self._codes: dict[str, tuple[str, str]] = {}  # code -> (redirect_uri, realm)
        self._used_codes: set[str] = set()
        self._grants: list[_Grant] = []
        self._runner: web.AppRunner | None = None
        self._raw: asyncio.Server | None = None
        self._raw_writers: set[asyncio.StreamWriter] = set()
        self.base_url = ""
        self.raw_url = ""

    # -- endpoints -----------------------------------------------------------

    @property
    def authorization_endpoint(self) -> str:
        return f"{self.base_url}/authorize"

    @property
    def token_endpoint(self) -> str:
        return f"{self.base_url}/token"

    @property
    def raw_token_endpoint(self) -> str:
        """The same token endpoint on the raw front, framed by ``Behaviour.wire``."""
        return f"{self.raw_url}/token"

    @property
    def revocation_endpoint(self) -> str:
        return f"{self.base_url}/revoke"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/authorize", self._authorize)
        app.router.add_route("*", "/token", self._token_http)
        app.router.add_route("*", "/revoke", self._revoke_http)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._raw = await asyncio.start_server(self._raw_connection, "127.0.0.1", 0)
        self.raw_url = f"http://127.0.0.1:{self._raw.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            for writer in list(self._raw_writers):
                writer.close()
            await self._raw.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what the tests read -------------------------------------------------

    def calls(self, endpoint: str) -> list[Seen]:
        return [s for s in self.seen if s.endpoint == endpoint]

    def grant_types(self) -> list[str]:
        return [s.params().get("grant_type", "") for s in self.calls("token")]

    def live_refresh_token(self) -> str | None:
        live = [g for g in self._grants if not g.revoked]
        return live[-1].refresh_token if live else None

    def is_access_token_valid(self, token: str) -> bool:
        return any(token in g.access_tokens and not g.revoked for g in self._grants)

    def is_revoked(self, refresh_token: str) -> bool:
        return any(g.revoked for g in self._grants if g.refresh_token == refresh_token)

    # -- the authorization endpoint (RFC 6749 §4.1.1, §4.1.2) ----------------

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        self._record("authorize", request.method, request.headers, b"", 302)
        redirect_uri = query.get("redirect_uri", "")
        if query.get("client_id") != self.client_id or not redirect_uri.startswith("http"):
            return web.Response(status=400, text="unknown client or redirect_uri")
        back = URL(redirect_uri)
        if query.get("response_type") != "code":
            return _found(back, [("error", "unsupported_response_type"), ("state", query["state"])])
        state = query.get("state", "")
        if self.behaviour.deny:  # §4.1.2.1: the user said no
            return _found(
                back,
                [
                    ("error", "access_denied"),
                    ("state", state),
                    ("error_description", "The user denied access"),
                ],
            )
        code = self.behaviour.code_prefix + secrets.token_urlsafe(24)
        self._codes[code] = (redirect_uri, self.realm_id)
        self.issued.append(code)
        params = [("code", code), ("state", state)]
        params.append((self.behaviour.realm_param, self.realm_id))
        return _found(back, params + self.behaviour.callback_extra)

    # -- the token endpoint (RFC 6749 §3.2, §4.1.3, §5, §6) ------------------

    async def _token_http(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        answer = await self._token(request.method, request.headers, body)
        self._record("token", request.method, request.headers, body, answer.status)
        return await self._frame(request, answer)

    async def _token(self, method: str, headers: Mapping[str, str], body: bytes) -> Answer:
        behaviour = self.behaviour
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.redirect_token_to is not None:
            return Answer(307, b"", {"Location": behaviour.redirect_token_to})
        if behaviour.token_answers:
            return behaviour.token_answers.pop(0)
        if method != "POST":
            return Answer.error(405, "invalid_request", "POST only", Allow="POST")
        form, refusal = self._client_form(headers, body)
        if refusal is not None:
            return refusal
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return self._exchange(form)
        if grant_type == "refresh_token":
            return self._refresh(form)
        return Answer.error(400, "unsupported_grant_type")

    def _exchange(self, form: Mapping[str, str]) -> Answer:
        code = form.get("code", "")
        issued = self._codes.get(code)
        if issued is None or code in self._used_codes:
            return Answer.error(400, "invalid_grant", "Invalid authorization code")
        self._used_codes.add(code)
        redirect_uri, realm_id = issued
        if form.get("redirect_uri") != redirect_uri:  # §4.1.3: must be identical
            return Answer.error(400, "invalid_grant", "redirect_uri does not match")
        grant = _Grant(realm_id, self._new("rt-"))
        self._grants.append(grant)
        return self._tokens(grant, grant.refresh_token)

    def _refresh(self, form: Mapping[str, str]) -> Answer:
        presented = form.get("refresh_token", "")
        grant = next(
            (g for g in self._grants if g.refresh_token == presented and not g.revoked), None
        )
        if grant is None:
            return Answer.error(400, "invalid_grant", "Incorrect or invalid refresh token")
        rotation = self.behaviour.rotation
        if rotation == "always":
            grant.refresh_token = self._new("rt-")  # the presented one dies at once
        return self._tokens(grant, None if rotation == "omit" else grant.refresh_token)

    def _tokens(self, grant: _Grant, refresh_token: str | None) -> Answer:
        behaviour = self.behaviour
        access_token = self._new("at-")
        grant.access_tokens.append(access_token)
        data: dict[str, object] = {"access_token": access_token}
        for name, value in (
            ("token_type", behaviour.token_type),
            ("expires_in", behaviour.expires_in),
            ("refresh_token", refresh_token),
            ("x_refresh_token_expires_in", behaviour.x_refresh_token_expires_in),
        ):
            if value is not OMIT and value is not None:
                data[name] = value
        data.update(behaviour.extra)
        return Answer(
            200,
            json.dumps(data).encode(),
            {"Content-Type": behaviour.content_type, **_NO_STORE},
        )

    # -- the revocation endpoint (RFC 7009 §2; Intuit: a JSON body) ----------

    async def _revoke_http(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        answer = self._revoke(request.method, request.headers, body)
        self._record("revoke", request.method, request.headers, body, answer.status)
        return await self._frame(request, answer)

    def _revoke(self, method: str, headers: Mapping[str, str], body: bytes) -> Answer:
        if method != "POST":
            return Answer.error(405, "invalid_request", "POST only", Allow="POST")
        refusal = self._authenticate(headers, {})
        if refusal is not None:
            return refusal
        token = self._revocation_token(headers, body)
        if token is None:
            return Answer.error(400, "invalid_request", "no token in a body this server reads")
        answer = self.behaviour.revocation_answer
        if 200 <= answer.status < 300:
            # §2.2: an unknown token is answered 200 as well; the grant dies with its token.
            for grant in self._grants:
                if token == grant.refresh_token or token in grant.access_tokens:
                    grant.revoked = True
        return answer

    def _revocation_token(self, headers: Mapping[str, str], body: bytes) -> str | None:
        accepts = self.behaviour.revocation_body
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type == "application/json" and accepts in ("json", "either"):
            with contextlib.suppress(ValueError):
                data = json.loads(body)
                token = data.get("token") if isinstance(data, dict) else None
                return token if isinstance(token, str) and token else None
        if content_type == "application/x-www-form-urlencoded" and accepts in ("form", "either"):
            form = _form(body)
            return form.get("token") if form else None
        return None

    # -- client authentication (RFC 6749 §2.3.1) -----------------------------

    def _client_form(
        self, headers: Mapping[str, str], body: bytes
    ) -> tuple[dict[str, str], Answer | None]:
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        form = _form(body) if content_type == "application/x-www-form-urlencoded" else None
        if form is None:
            return {}, Answer.error(400, "invalid_request", "expected one form-encoded body")
        return form, self._authenticate(headers, form)

    def _authenticate(self, headers: Mapping[str, str], form: Mapping[str, str]) -> Answer | None:
        if "client_secret" in form:
            # This server takes client_secret_basic only (§2.3.1: the body is NOT RECOMMENDED).
            return Answer.error(
                401,
                "invalid_client",
                "credentials in the body are refused",
                **{"WWW-Authenticate": _REALM},
            )
        scheme, _, encoded = headers.get("Authorization", "").partition(" ")
        pair = None
        if scheme.lower() == "basic":
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                pair = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        if pair is None or ":" not in pair:
            return Answer.error(
                401,
                "invalid_client",
                "client authentication required",
                **{"WWW-Authenticate": _REALM},
            )
        user, _, password = pair.partition(":")
        if self.behaviour.basic_decoding == "rfc6749":
            user, password = unquote_plus(user), unquote_plus(password)
        if (user, password) != (self.client_id, self.client_secret):
            return Answer.error(
                401,
                "invalid_client",
                "client authentication failed",
                **{"WWW-Authenticate": _REALM},
            )
        return None

    # -- framing -------------------------------------------------------------

    async def _frame(self, request: web.Request, answer: Answer) -> web.StreamResponse:
        behaviour = self.behaviour
        headers = CIMultiDict(answer.headers)
        headers.update(behaviour.headers)
        body = answer.body
        if behaviour.gzip and body:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        if behaviour.close:
            headers["Connection"] = "close"
        if not behaviour.chunked:
            response = web.Response(status=answer.status, body=body, headers=headers)
            if behaviour.close:
                response.force_close()
            return response
        stream = web.StreamResponse(status=answer.status, headers=headers)
        stream.enable_chunked_encoding()
        if behaviour.close:
            stream.force_close()
        await stream.prepare(request)
        for start in range(0, len(body), 7):
            await stream.write(body[start : start + 7])
        await stream.write_eof()
        return stream

    async def _raw_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answers written by hand; the connection closes after one, except with
        ``wire="drop-reused"``: kept alive, it is closed unanswered when the next
        request arrives on it (a server's idle timeout striking as the client
        reuses the connection, RFC 9112 §9.3.1)."""
        self._raw_writers.add(writer)
        try:
            served = 0
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method = request_line.split(" ")[0]
                headers: CIMultiDict[str] = CIMultiDict()
                for line in filter(None, lines):
                    name, _, value = line.partition(":")
                    headers.add(name.strip(), value.strip())
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                wire = self.behaviour.wire
                if wire == "drop-reused" and served:
                    self._record("token-dropped", method, headers, body, 0)
                    return
                answer = await self._token(method, headers, body)
                self._record("token", method, headers, body, answer.status)
                writer.write(_raw_answer(answer, wire))
                await writer.drain()
                served += 1
                if wire != "drop-reused":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self._raw_writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # -- helpers -------------------------------------------------------------

    def _new(self, prefix: str) -> str:
        value = prefix + secrets.token_urlsafe(32)
        self.issued.append(value)
        return value

    def _record(
        self, endpoint: str, method: str, headers: Mapping[str, str], body: bytes, status: int
    ) -> None:
        self.seen.append(
            Seen(endpoint, method, CIMultiDictProxy(CIMultiDict(headers)), body, status)
        )


def _raw_answer(answer: Answer, wire: Wire | None) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized"}.get(answer.status, "Status")
    version = "HTTP/1.0" if wire == "http10" else "HTTP/1.1"
    lines = [f"{version} {answer.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in answer.headers.items()]
    if wire != "http10":  # HTTP/1.0 style: no length, the body ends when the connection does
        lines.append(f"Content-Length: {len(answer.body)}")
    if wire != "drop-reused":
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if wire == "cut":
        return head + answer.body[: len(answer.body) // 2]
    return head + answer.body


def _form(body: bytes) -> dict[str, str] | None:
    """A form body; ``None`` when a parameter repeats (RFC 6749 §3.2) or it is not UTF-8."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        return None
    form = dict(pairs)
    return form if len(form) == len(pairs) else None


def _found(back: URL, params: list[tuple[str, str]]) -> web.Response:
    target = back.extend_query(params)
    return web.Response(status=302, headers={"Location": str(target), **_NO_STORE})
