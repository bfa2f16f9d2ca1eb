"""Secrets out of everything capworks prints, logs, stores or publishes: one `redact` function.

What it masks: the password in a URL's userinfo (`redis://:pw@host`, `postgresql://u:pw@db`),
presigned-URL signatures and credentials (`X-Amz-Signature`, `X-Amz-Credential`,
`X-Amz-Security-Token`, `Signature`, `AWSAccessKeyId`), the value of every query or fragment
parameter whose name says it is a credential (`token`, `access_token`, `key`, `api_key`,
`X-Goog-Credential`, `X-Goog-Signature`, `sig`, `client_secret`, `password`, ...: see
`is_secret_parameter`), bearer tokens, and every secret value registered from the settings
(`register_secrets`), wherever it appears. Logging goes through
`RedactingFilter` (`install_log_redaction`), error messages bound for the `failures` and
`bad_messages` tables, Celery's `argsrepr` (what Flower shows) and CLI output through `redact`.
What is stored from outside is cut before it is redacted (`stored_text`); log messages and what
the CLI prints have their control characters escaped (`escape_controls`).

An http(s) image URI is stored and shown masked rather than without its query: the query may be
what tells one image from another (`/render?id=17`), so dropping it would merge images into one
row, while masking only a credential's value keeps such URIs apart and gives one object one
stable URI however often its token is rotated or its URL re-signed (the URI is the identity the
crawl's "already captioned" check and the upserts go by). The price: two URIs that differ only
in such a value (`?key=a.jpg`, `?key=b.jpg`) are one image to capworks.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from urllib.parse import unquote

from capworks.schema.jobs import escaped

MASK = "***"
# What a stored text (a bad message's body, a reason) keeps by default: a 100 MiB job message
# cost 8 s of the regexes below and ~600 MiB when it was redacted whole before being cut.
MAX_STORED_CHARS = 64 * 1024
# Redaction sees this much past the cut, so a secret that straddles it is masked whole: every
# pattern but a bare query value is bounded well below it, and a cut query value is masked too.
_CUT_MARGIN_CHARS = 4096
# A secret shorter than this is not searched for as a bare value: masking every "1" or "test"
# in a log would hide more than it protects. URL passwords and tokens are masked by shape anyway.
MIN_SECRET_CHARS = 6

# Every repeat is bounded: an unbounded scheme made a 5 MB run of letters (a malformed job's
# padding) cost O(n^2), holding the GIL for hours. Schemes are short (RFC 3986 names none over
# 30 characters); a userinfo over 1 KiB is not a credential anyone types.
_USERINFO = re.compile(
    r"(?<![A-Za-z0-9+.\-])(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]{0,31}://)"
    r"(?P<user>[^:@/\s?#]{0,1024}):(?P<pw>[^@\s/]{0,1024})@"
)
_QUERY_SECRET = re.compile(
    r"(?P<name>(?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|sig)=)"
    r"(?P<value>[^&\s\"'#<>]+)",
    re.IGNORECASE,
)
# Any query or fragment parameter (after `?`, `&`, `;` or `#`): its name is judged by
# `is_secret_parameter`, URL-decoded, so `%74oken=` is masked like `token=`.
_PARAMETER = re.compile(r"(?<=[?&;#])(?P<name>[^=&;#\s\"'<>?]{1,128})=(?P<value>[^&;#\s\"'<>]+)")
# A parameter name is a credential when it is, or ends in (after `_`, `-` or `.`), one of these.
_CREDENTIAL_WORDS = (
    "token|key|apikey|secret|password|passwd|pwd|sig|signature|credential|credentials"
    "|auth|authorization|sessionid|jwt"
)
_CREDENTIAL_NAME = re.compile(rf"(?:.*[_\-.])?(?:{_CREDENTIAL_WORDS})", re.IGNORECASE)
_BEARER = re.compile(r"(?P<name>\bBearer\s+)(?P<value>[^\s\"',;]+)", re.IGNORECASE)

# What a terminal or a log reader would act on rather than show: C0 and C1 controls, DEL, the
# Unicode line and paragraph separators and the bidirectional overrides ("Trojan source").
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_OR_NEWLINE_KEPT = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these values (and their URL-decoded forms) wherever `redact` sees them from now on."""
    global _secrets
    found = set()
    for value in values:
        if value and len(value) >= MIN_SECRET_CHARS:
            found.update({value, unquote(value)})
    with _lock:
        _secrets = _secrets | frozenset(v for v in found if len(v) >= MIN_SECRET_CHARS)


def url_password(url: str | None) -> str | None:
    """The password in a URL's userinfo, URL-decoded; None when it has none."""
    if not url:
        return None
    match = _USERINFO.search(url)
    return unquote(match["pw"]) if match and match["pw"] else None


def redact(text: str) -> str:
    """`text` with URL passwords, presigned signatures, bearer tokens and registered secrets
    replaced by `***`."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@" if m["pw"] else m[0], text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['name']}{MASK}", text)
    text = _PARAMETER.sub(_mask_secret_parameter, text)
    text = _BEARER.sub(lambda m: f"{m['name']}{MASK}", text)
    for secret in sorted(_secrets, key=len, reverse=True):  # a longer one may contain a shorter
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def is_secret_parameter(name: str) -> bool:
    """True for a query parameter name that carries a credential: `token`, `access_token`,
    `key`, `api_key`, `x-api-key`, `X-Goog-Credential`, `sig`, `client_secret`, ... (URL-decoded,
    any case); `monkey` or `keyword` are not."""
    return _CREDENTIAL_NAME.fullmatch(unquote(name)) is not None


def _mask_secret_parameter(match: re.Match[str]) -> str:
    if match["value"] == MASK or not is_secret_parameter(match["name"]):
        return match[0]
    return f"{match['name']}={MASK}"


def escape_controls(text: str, *, newlines: bool = False) -> str:
    """`text` with control characters written as escapes (`\\n`, `\\x1b`, `\\u202e`), so that
    a name from outside can neither forge a log line nor drive a terminal; with `newlines`,
    line breaks are kept (a traceback shown as such)."""
    pattern = _CONTROL_OR_NEWLINE_KEPT if newlines else _CONTROL
    return pattern.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match[0]
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def stored_text(text: str, max_chars: int = MAX_STORED_CHARS) -> str:
    """`text` as a table keeps it: cut to `max_chars` (its full length noted) *before* it is
    escaped (NUL, stray surrogates) and redacted, so neither ever runs over more than
    `max_chars` and a margin."""
    kept = redact(escaped(text[: max_chars + _CUT_MARGIN_CHARS]))
    if len(text) <= max_chars and len(kept) <= max_chars:
        return kept
    return f"{kept[:max_chars]} ... [cut: {len(text):,} characters in all]"


def redact_uri(uri: str) -> str:
    """An image URI as capworks stores and shows it: an http(s) URL redacted (a presigned URL
    loses its signature, which expires anyway; `?token=`, `key=` and the like their value, so
    one object keeps one URI however its credential changes); any other URI as it is, since an
    object key may spell anything, `sig=` included."""
    if uri[:8].lower().startswith(("http://", "https://")):
        return redact(uri)
    return uri


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (arguments merged in) and traceback through `redact`; the
    message's control characters are escaped, so a name with a newline cannot forge a line."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record, with its text redacted."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: keep what logging would show
            message = str(record.msg)
        record.msg, record.args = escape_controls(redact(message)), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Put one `RedactingFilter` on every handler of `logger` (the root logger by default):
    a handler filter sees the records of every child logger, a logger filter only its own."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
