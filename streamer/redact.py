"""Credentials out of what is shown: URIs in logs, replies, events and error messages.

A source's URI may carry secrets: the password of its user info (`rtsp://user:PASSWORD@host/...`) and
query parameters that hold a key or token (`https://host/live.m3u8?token=SECRET`). The source keeps the
full URI to connect (and a snapshot keeps it to reconnect after a restart); everything shown uses
`redact_uri(uri)`, where each secret is `***`:

    >>> redact_uri("rtsp://admin:hunter2@10.0.0.5/live?channel=1&token=abc")
    'rtsp://admin:***@10.0.0.5/live?channel=1&token=***'

Secret query parameters: those whose name, lower-cased and without separators, ends in one of
`SECRET_PARAMETERS` (`apikey`, `access_token`, `X-Amz-Signature`, `sig` all match). The user name is kept:
it helps to tell which login was refused.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
#: Endings of query parameter names (lower case, separators removed) whose values are secrets.
SECRET_PARAMETERS = (
    "password", "passwd", "pwd", "pass", "secret", "token", "key", "auth", "sig", "signature", "credential",
    "credentials",
)
# A URI inside free text (an FFmpeg message that echoes the URL it was given): scheme://, then up to a
# space or a quote.
_URI_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# Secrets shorter than this are masked only inside URIs: masking every "ab" of a message would garble it.
_MIN_LOOSE_SECRET = 4


def _is_secret_parameter(name: str) -> bool:
    return re.sub(r"[^a-z0-9]", "", unquote(name).lower()).endswith(SECRET_PARAMETERS)


def _split(uri: str) -> tuple[str, str, str, str, str] | None:
    """(scheme://, user info, host and path, query, fragment) of a URI with an authority; None otherwise."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return None
    rest, hash_, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")  # the host follows the last "@"
    return scheme + sep, userinfo + at, host + slash + path, question + query, hash_ + fragment


def secrets_of(uri: str) -> list[str]:
    """The secret values in `uri` (password, secret query values), as written and percent-decoded."""
    parts = _split(uri)
    if parts is None:
        return []
    found = []
    user, colon, password = parts[1].removesuffix("@").partition(":")
    if colon and password:
        found.append(password)
    for pair in parts[3].removeprefix("?").split("&"):
        name, eq, value = pair.partition("=")
        if eq and value and _is_secret_parameter(name):
            found.append(value)
    return sorted({form for value in found for form in (value, unquote(value))}, key=len, reverse=True)


def redact_uri(uri: str) -> str:
    """`uri` as it may be shown: its password and secret query values replaced by `***`."""
    parts = _split(uri)
    if parts is None:
        return uri
    start, userinfo, rest, query, fragment = parts
    user, colon, password = userinfo.removesuffix("@").partition(":")
    if colon and password:
        userinfo = f"{user}:{MASK}@"
    if query:
        pairs = []
        for pair in query[1:].split("&"):
            name, eq, value = pair.partition("=")
            pairs.append(f"{name}={MASK}" if eq and value and _is_secret_parameter(name) else pair)
        query = "?" + "&".join(pairs)
    return start + userinfo + rest + query + fragment


def redact_text(text: str, uri: str | None = None) -> str:
    """`text` (an error message) with every URI in it redacted, and the secrets of `uri` masked wherever
    they appear (an FFmpeg message may echo a URL in its own form)."""
    text = _URI_IN_TEXT.sub(lambda m: redact_uri(m.group()), text)
    for secret in secrets_of(uri) if uri else ():
        if len(secret) >= _MIN_LOOSE_SECRET:
            text = text.replace(secret, MASK)
    return text
