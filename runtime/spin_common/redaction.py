"""Secret hygiene: scrub values before they reach MLflow params/tags/artifacts or logs.

Specs, argv and environments pass through many hands (status, events, MLflow, log lines); a
credential that leaks into MLflow stays in its database forever. Everything that leaves the
process goes through :func:`redact` first. The rule is by key name, word by word, so
``AWS_SECRET_ACCESS_KEY``, ``apiKey`` and ``sessionToken`` are scrubbed but ``max_new_tokens``
and ``tokenizer`` (ordinary parameters) are not. Passwords embedded in URLs
(``https://user:pass@host``) are scrubbed wherever they appear in text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

_SECRET_WORDS = {
    "secret", "secrets", "password", "passwd", "pwd", "passphrase", "token", "key", "keys",
    "credential", "credentials", "auth", "authorization", "cookie", "bearer", "signature",
    "apikey", "accesskey", "secretkey", "privatekey", "sessiontoken", "accesstoken",
}  # fmt: skip # a word list, packed
_SECRET_SUBSTRINGS = ("secret", "password", "passwd", "credential", "apikey", "privatekey")
_WORD_RE = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_URL_USERINFO_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/\s:@]+):[^/\s@]+@"
)
_BEARER_RE = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]+")
_ASSIGNMENT_RE = re.compile(
    r"(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<sep>\s*[=:]\s*|=)(?P<value>[^\s,;&\"']+)"
)


def is_secret_key(key: str) -> bool:
    """Whether a key names a secret (by whole words, so ``max_new_tokens`` is not one)."""
    words = [w.lower() for w in _WORD_RE.findall(key)]
    if any(w in _SECRET_WORDS for w in words):
        return True
    squashed = "".join(words)
    return any(s in squashed for s in _SECRET_SUBSTRINGS)


def redact_text(text: str) -> str:
    """Scrub URL passwords and ``secret_key=value`` assignments inside free text."""
    text = _URL_USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _BEARER_RE.sub(lambda m: f"{m[1]} {REDACTED}", text)

    def assignment(m: re.Match[str]) -> str:
        if is_secret_key(m["key"]):
            return f"{m['key']}{m['sep']}{REDACTED}"
        return m.group(0)

    return _ASSIGNMENT_RE.sub(assignment, text)


def redact(value: Any, key: str | None = None) -> Any:
    """A copy of ``value`` with secret-named scalars replaced by ``***`` (mappings and lists are
    walked, strings have URL passwords scrubbed). Secret *references* such as
    ``credentialsSecret: {name: s3-creds}`` keep their structure; only scalars are replaced.
    Kubernetes env entries ``{name: AWS_SECRET_ACCESS_KEY, value: ...}`` are caught by name."""
    if isinstance(value, Mapping):
        out = {k: redact(v, str(k)) for k, v in value.items()}
        name = value.get("name")
        if isinstance(name, str) and "value" in out and is_secret_key(name):
            out["value"] = REDACTED  # Kubernetes-style env entry {name: ..._TOKEN, value: ...}
        return out
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if key is not None and is_secret_key(key) and value is not None and value != "":
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """An argv with the values of secret-named flags (``--token X``, ``--api-key=X``) scrubbed."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-"):
            flag, eq, _ = arg.partition("=")
            if is_secret_key(flag.lstrip("-")):
                if eq:
                    out.append(f"{flag}={REDACTED}")
                else:
                    out.append(arg)
                    hide_next = True
                continue
        out.append(redact_text(arg))
    return out
