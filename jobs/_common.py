"""What every job does before it hands over to the CLI: parse, describe where it runs, log the config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

log = logging.getLogger("mer.jobs")

REDACTED = "***"
# Key names whose values are credentials wherever they appear (config mappings, env var names).
# Matched as whole name segments, so `max_tokens` or `keyframe_tolerance` are not hidden.
_SECRET_KEY = re.compile(r"(?:^|[_.\-])(?:secret|token|password|passwd|credentials?|auth|api_?key|access_?key"
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
    if key and _SECRET_KEY.search(key) and obj not in (None, "", {}, []):
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
        out[name] = "set" if _SECRET_KEY.search(name) else _redact_url(env[name])
    return out


def overlay_overrides(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    """Flatten a config overlay (a partial ``ray_config.yaml`` mapping) into ``key.sub=value`` overrides.

    Values are written as JSON, which the override parser reads back unchanged (YAML is a superset).
    """
    out: list[str] = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += overlay_overrides(value, f"{dotted}.")
        else:
            out.append(f"{dotted}={json.dumps(value)}")
    return out


def expand_overlays(argv: Sequence[str]) -> list[str]:
    """Replace every ``--overlay FILE`` in ``argv`` with the ``--set`` overrides of that file.

    Overlays apply in order, before the explicit ``--set`` flags that follow them, so
    ``--config ray_config.yaml --overlay cluster/ray_config.gpu.yaml --set train.lr=3e-4`` layers the
    cluster's resources over the repo config and one more change over both.
    """
    from mer.config import ConfigError

    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--overlay" or arg.startswith("--overlay="):
            path = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if not path:
                raise ConfigError("--overlay needs a file")
            try:
                with open(path, encoding="utf-8") as f:
                    mapping = yaml.safe_load(f) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ConfigError(f"overlay {path}: {e}") from e
            if not isinstance(mapping, dict):
                raise ConfigError(f"overlay {path}: top level must be a mapping")
            for item in overlay_overrides(mapping):
                out += ["--set", item]
        else:
            out.append(arg)
    return out


def resolved_config(command: str, args: argparse.Namespace) -> Any:
    """The config the CLI handler will run with (same rules as ``mer.cli``: profile, overrides, --cpu)."""
    from mer.config import cpu_only, load_config

    if command == "demo":  # the demo handler forces the tiny profile and CPU placement
        return cpu_only(load_config(args.config, overrides=args.overrides, profile=args.profile or "tiny"))
    cfg = load_config(args.config, overrides=args.overrides, profile=args.profile)
    return cpu_only(cfg) if args.cpu else cfg


def log_job_start(command: list[str], args: argparse.Namespace) -> None:
    """Log the command line, the environment summary and the resolved config, all redacted."""
    from mer.config import ConfigError

    log.info("job mer %s", " ".join(redact(list(command))))
    log.info("environment: %s", environment_summary())
    try:
        cfg = resolved_config(command[0], args)
    except ConfigError:
        return  # mer.cli.main reports it with exit code 2
    dumped = redact(cfg.model_dump(mode="json"))
    log.info("resolved config (hash %s):\n%s", cfg.hash(), yaml.safe_dump(dumped, sort_keys=False))


def job_main(command: Sequence[str], argv: Sequence[str] | None = None) -> int:
    """Run ``mer <command> <argv>`` as a Ray job and return its exit code.

    Arguments are the CLI's (``mer.cli.build_parser``) plus ``--overlay FILE`` (see :func:`expand_overlays`),
    so a job accepts the flags of the command; the handler's ``init_ray`` joins the cluster of the
    submitted job (``ray.init()`` honours RAY_ADDRESS).
    """
    from mer.cli import build_parser, main
    from mer.config import ConfigError
    from mer.runtime import setup_logging

    try:
        rest = expand_overlays(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"mer: {e}", file=sys.stderr)
        return 2
    full = [*command, *rest]
    args = build_parser().parse_args(full)
    setup_logging(args.log_level)
    log_job_start(full, args)
    return main(full)
