"""Secrets never print: URL passwords, bearer tokens and webhook credentials masked wherever text about a
setting or a connection error leaves the process (the CLI, logs, run metadata, HTTP answers).

:func:`redact_url` keeps a URL readable (scheme, user, host, port, path) and masks its password and its
query values; :func:`redact_text` masks the given secrets and anything that looks like a URL's userinfo
or a ``password=`` setting inside free text such as a driver's error message. Pure string work, no I/O.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
_URL_USERINFO = re.compile(r"(?<=://)([^/\s:@]*)(:[^/\s]*)?@")  # user:password@ (a password may hold an @)
_PASSWORD_SETTING = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact_url(url: str | None) -> str | None:
    """``postgresql://app:s3cret@db:5432/x?sslpassword=y`` → ``postgresql://app:***@db:5432/x?sslpassword=***``.

    The user name stays (it says which role is meant); the password and every query value are masked
    (webhook tokens travel there). None stays None."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}" if ":" in userinfo or not user else f"{user}@{host}"
    query = urlencode([(k, MASK) for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def url_secrets(*urls: str | None) -> tuple[str, ...]:
    """The passwords inside ``urls`` (raw and percent-decoded), for :func:`redact_text`."""
    found: list[str] = []
    for url in urls:
        if not url:
            continue
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            found += [password, unquote(password)]
    return tuple(dict.fromkeys(found))


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with every one of ``secrets`` (passwords, tokens) masked, and URL userinfo passwords and
    ``password=`` settings masked whatever they are."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}:{MASK}@" if m.group(2) else m.group(0), text)
    return _PASSWORD_SETTING.sub(rf"\g<1>{MASK}", text)
