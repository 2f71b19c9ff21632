"""The one place that hides secrets in text: known secret values and URL credentials.

Used by the logs (every record), the API client (answers that may echo a credential), the
config errors (a value quoted in an error line) and git (its stderr quotes remote URLs).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

REDACTED = "**********"
# Shorter values would redact ordinary words; no real credential is that short.
MIN_SECRET_LENGTH = 4

# `scheme://anything@`: greedy up to the last `@` before a space or a quote, so that a password
# with a stray `/` or `@` in it goes too. Over-redacting a path with an `@` is the safe error.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"]*@")


def hide_url_credentials(text: str) -> str:
    """`https://user:pw@host/x` -> `https://***@host/x`; scp-like `git@host:x` has no secret."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


class SecretScrubber:
    """Replaces known secret values, and their base64 form, with REDACTED."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._pattern: re.Pattern[str] | None = None
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        plain = {value for value in secrets if len(value) >= MIN_SECRET_LENGTH}
        # An `Authorization: Basic` header carries the secret base64-encoded.
        encoded = {base64.b64encode(value.encode()).decode() for value in plain}
        # Longest first, so a secret that contains another is replaced whole.
        ordered = sorted(plain | encoded, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def scrub(self, text: str) -> str:
        """`text` with URL credentials and every known secret hidden."""
        text = hide_url_credentials(text)
        if self._pattern is not None:
            text = self._pattern.sub(REDACTED, text)
        return text
