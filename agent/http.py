"""The HTTP side of the Prefect client: auth headers, retries, typed errors, tolerant parsing.

Every call goes through `ApiTransport._request`:

- transport errors (timeouts included), 408, 429 and 5xx are retried with exponential backoff
  (agent.backoff), honouring `Retry-After` (seconds or an HTTP date, capped); after the last
  attempt `ApiUnavailable` names the method, path and last error;
- 401 and 403 fail at once with `CredentialsRefused` (retrying cannot fix a key);
- a redirect (3xx: e.g. http:// answered by a redirect to https://) is `ApiUnavailable` at once,
  naming where it points: following it would resend credentials and POST bodies elsewhere, and
  taking it for success would count logs and events as delivered that never arrived;
- any other 4xx is `ApiError(status, detail)`;
- a body that does not parse (invalid JSON, an HTML error page, the wrong shape) is
  `MalformedResponse`, never a raw json or pydantic exception. In list responses a malformed
  item is logged (logger "agent.api") and skipped; the other items are kept. Where the body is
  not read (logs, events, a PATCH), an answer that is not JSON (a proxy's or captive portal's
  HTML page with 200) is malformed too: it is not the API's word;
- error messages quote at most an excerpt of the body, with the client's own credentials cut
  out (a debugging proxy may echo the request's headers).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from agent import __version__
from agent.backoff import Backoff
from agent.redaction import SecretScrubber

log = logging.getLogger("agent.api")

# The API version Prefect 3.8.8's own client sends (prefect/client/constants.py).
API_VERSION = "0.8.4"
RETRY_STATUSES = frozenset({408, 429})
EXCERPT_CHARS = 200

M = TypeVar("M", bound=BaseModel)


class ApiConfig(Protocol):
    """What the client reads from `settings.ApiSettings`."""

    @property
    def url(self) -> str: ...
    @property
    def key(self) -> SecretStr | None: ...
    @property
    def auth_string(self) -> SecretStr | None: ...
    @property
    def timeout(self) -> float: ...


class PrefectApiError(Exception):
    """Base of every error the client raises."""


class ApiUnavailable(PrefectApiError):
    """The server could not be reached or kept failing (transport errors, 408, 429, 5xx)."""


class CredentialsRefused(PrefectApiError):
    """401 or 403: the key or auth string is wrong or lacks permission."""


class ApiError(PrefectApiError):
    """A definite client error (4xx other than 401/403/408/429)."""

    def __init__(self, status: int, detail: str, method: str = "", path: str = "") -> None:
        self.status = status
        self.detail = detail
        where = f"{method} {path} " if method else ""
        super().__init__(f"{where}answered HTTP {status}: {detail}")


class MalformedResponse(PrefectApiError):
    """A response body that is not what the endpoint documents."""

    def __init__(self, method: str, path: str, status: int, problem: str, body: str) -> None:
        self.method, self.path, self.status, self.problem = method, path, status, problem
        self.excerpt = excerpt(body)
        super().__init__(
            f"{method} {path} answered HTTP {status} with a malformed body ({problem}): "
            f"{self.excerpt!r}"
        )


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def describe_validation(exc: ValidationError) -> str:
    """One short line about a validation error, without the (possibly huge) input."""
    errors = exc.errors(include_input=False, include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now (>= 0), or None when absent or unreadable."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def auth_headers(config: ApiConfig) -> dict[str, str]:
    # Like Prefect's own client: a self-hosted auth string wins over a Cloud key.
    if config.auth_string is not None and config.auth_string.get_secret_value():
        token = base64.b64encode(config.auth_string.get_secret_value().encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if config.key is not None and config.key.get_secret_value():
        return {"Authorization": f"Bearer {config.key.get_secret_value()}"}
    return {}


def _secrets_of(config: ApiConfig, headers: dict[str, str]) -> set[str]:
    """What must never be quoted: the key, the auth string and the header made from them."""
    found = {secret.get_secret_value() for secret in (config.key, config.auth_string) if secret}
    found.update(value.split(" ", 1)[-1] for value in headers.values())
    return {s for s in found if s}


def _display_url(url: str) -> str:
    # A URL with user:pass@ must not put the password into messages.
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        return "<the configured API URL>"


class ApiTransport:
    """An async context manager around one `httpx.AsyncClient` for the Prefect API."""

    def __init__(
        self,
        api: ApiConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 10.0,
        retry_after_max: float = 60.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.url = _display_url(api.url)
        self._max_attempts = max_attempts
        self._backoff = Backoff(backoff_base, backoff_max, rng or random.Random())
        self._retry_after_max = retry_after_max
        self._sleep = sleep
        self._auth = auth_headers(api)
        self._scrubber = SecretScrubber(_secrets_of(api, self._auth))
        headers = {
            "X-PREFECT-API-VERSION": API_VERSION,
            "User-Agent": f"runner-agent/{__version__}",
            **self._auth,
        }
        self._http = httpx.AsyncClient(
            base_url=api.url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(api.timeout),
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header (if any), for other connections such as websockets."""
        return dict(self._auth)

    # -- transport ---------------------------------------------------------------------------

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed `attempt` (1-based): the policy, or the server's word."""
        if retry_after is not None:
            return min(retry_after, self._retry_after_max)
        return self._backoff.delay(attempt)

    async def _request(
        self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None
    ) -> httpx.Response:
        last_error = "no attempt made"
        for attempt in range(1, self._max_attempts + 1):
            retry_after: float | None = None
            try:
                response = await self._http.request(
                    method, path.lstrip("/"), json=body, params=params
                )
            except httpx.DecodingError as exc:
                raise MalformedResponse(method, path, 0, f"undecodable body: {exc}", "") from exc
            except httpx.RequestError as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                last_error = self.scrub(last_error)
            else:
                status = response.status_code
                if status in (401, 403):
                    raise CredentialsRefused(
                        f"the API credentials were refused by {self.url} "
                        f"(HTTP {status} on {method} {path}); check api.key / api.auth_string"
                    )
                if 300 <= status < 400:
                    where = excerpt(self.scrub(response.headers.get("Location", "")), 120)
                    raise ApiUnavailable(
                        f"{method} {path} was redirected (HTTP {status}) to {where or 'nowhere'!r}"
                        f" by {self.url}; set api.url to the API's own address"
                    )
                if status in RETRY_STATUSES or status >= 500:
                    last_error = f"HTTP {status}: {excerpt(self.scrub(response.text.strip()))}"
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                elif status >= 400:
                    raise ApiError(status, self.scrub(_detail(response)), method, path)
                else:
                    return response
            if attempt < self._max_attempts:
                delay = self.backoff(attempt, retry_after)
                log.debug(
                    "%s %s failed (%s); attempt %d/%d, retrying in %.2fs",
                    method,
                    path,
                    last_error,
                    attempt,
                    self._max_attempts,
                    delay,
                )
                await self._sleep(delay)
        raise ApiUnavailable(
            f"{method} {path} failed after {self._max_attempts} attempt(s) "
            f"against {self.url}: {last_error}"
        )

    # -- parsing -----------------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """`text` without this client's credentials (an echoing proxy may quote them)."""
        return self._scrubber.scrub(text)

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except RecursionError as exc:
            raise self._malformed(response, "JSON nested too deeply") from exc
        except ValueError as exc:
            raise self._malformed(response, f"not JSON: {type(exc).__name__}") from exc

    def _no_content(self, response: httpx.Response) -> None:
        """An answer whose body is not read must still be the API's: empty or JSON."""
        if response.content.strip():
            self._json(response)

    def _malformed(self, response: httpx.Response, problem: str) -> MalformedResponse:
        try:
            text = response.text
        except (UnicodeDecodeError, LookupError):
            text = repr(response.content[:EXCERPT_CHARS])
        return MalformedResponse(
            response.request.method,
            self._path_of(response),
            response.status_code,
            problem,
            self.scrub(text),
        )

    def _path_of(self, response: httpx.Response) -> str:
        """The request's path relative to the API URL, as callers wrote it."""
        path, base = response.request.url.path, self._http.base_url.path
        return "/" + path[len(base) :] if path.startswith(base) else path

    def _one(self, response: httpx.Response, model: type[M]) -> M:
        data = self._json(response)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise self._malformed(
                response, f"not a {model.__name__}: {describe_validation(exc)}"
            ) from exc

    def _many(self, response: httpx.Response, model: type[M]) -> list[M]:
        data = self._json(response)
        if not isinstance(data, list):
            raise self._malformed(response, f"expected a list of {model.__name__}")
        items: list[M] = []
        for index, item in enumerate(data):
            try:
                items.append(model.model_validate(item))
            except ValidationError as exc:
                item_id = item.get("id") if isinstance(item, dict) else None
                log.warning(
                    "skipping malformed %s #%d (id %s) from %s %s: %s; item: %s",
                    model.__name__,
                    index,
                    excerpt(str(item_id), 60),
                    response.request.method,
                    self._path_of(response),
                    describe_validation(exc),
                    excerpt(self.scrub(_dump(item))),
                )
        return items


def _detail(response: httpx.Response) -> str:
    """FastAPI's `{"detail": ...}` when present, else an excerpt of the body."""
    try:
        data = response.json()
    except (ValueError, RecursionError):
        return excerpt(response.text.strip()) or response.reason_phrase
    if isinstance(data, dict) and "detail" in data:
        data = data["detail"]
    return excerpt(data if isinstance(data, str) else _dump(data))


def _dump(value: Any) -> str:
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
