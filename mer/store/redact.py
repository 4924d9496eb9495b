"""Credentials out of logs: redaction of config mappings, ``key=value`` arguments and URLs, and a summary of
the environment a job runs in that says which credentials are *present*, never their values."""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
# Key names whose values are credentials wherever they appear (config mappings, env var names).
# Matched as whole name segments, so `max_tokens` or `keyframe_tolerance` are not hidden.
SECRET_KEY = re.compile(r"(?:^|[_.\-])(?:secret|token|password|passwd|credentials?|auth|api_?key|access_?key"
                        r"|private_?key)(?:$|[_.\-])", re.IGNORECASE)
_ASSIGNMENT = re.compile(r"^([A-Za-z_][\w.\-]*)=(.*)$", re.DOTALL)
# Environment variables worth showing in a job log; values of secret-looking names are never shown.
_ENV_SHOWN = ("RAY_ADDRESS", "RAY_JOB_SUBMISSION_ID", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
              "AWS_PROFILE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "XDG_CACHE_HOME",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")


def _redact_url(value: str) -> str:
    """Drop the password of ``scheme://user:password@host`` URLs."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.password is None:
        return value
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}"))


def redact(obj: Any, key: str = "") -> Any:
    """A copy of ``obj`` with credential-looking values replaced by ``***`` (by key name and URL userinfo)."""
    if key and SECRET_KEY.search(key) and obj not in (None, "", {}, []):
        return REDACTED
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        m = _ASSIGNMENT.match(obj)
        if m:  # `--set section.KEY=value` overrides and NAME=URI sources
            k, v = m.groups()
            return f"{k}={redact(v, k.rsplit('.', 1)[-1])}"
        return _redact_url(obj)
    return obj


def environment_summary(env: dict[str, str] | None = None) -> dict[str, str]:
    """Where the job runs, for its log: cluster address, S3 endpoint, which credentials are *present*."""
    env = dict(os.environ if env is None else env)
    out: dict[str, str] = {}
    for name in _ENV_SHOWN:
        if name not in env:
            continue
        out[name] = "set" if SECRET_KEY.search(name) else _redact_url(env[name])
    return out
