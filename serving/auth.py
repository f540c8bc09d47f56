"""Bearer API keys, scopes and a per-client rate limit at the ingress.

    python -m serving.auth new-key --name city --scopes public [--rate-per-s 20 --burst 40]

prints a fresh key (give it to the client) and the entry the server keeps: its SHA-256 digest,
never the key. Clients send `Authorization: Bearer <key>`.

Scopes: `public` opens the product API (/v1/*); `internal` opens the raw Open Inference Protocol
routes (/v2/models/*, /v2/repository/*), which return every model's outputs for any input (model
extraction) and its metadata. Probes and discovery stay open (`OPEN_PATHS`). Every other path needs
a valid key of any scope, so an unauthenticated scanner learns nothing beyond a 401.

Refusals: 401 with `WWW-Authenticate: Bearer ...` (no key, a malformed header or an unknown key),
403 (a key without the route's scope), 429 with `Retry-After` (the key's token bucket is empty).
Each is counted in `courier_auth_refusals_total{reason,client}`. The bucket lives in the Ingress
replica: with R replicas a key can reach about R times its rate (docs/auth.md).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.errors import CourierError

Scope = Literal["public", "internal"]
OPEN_PATHS = frozenset({"/", "/v2", "/v2/health/live", "/v2/health/ready", "/openapi.json"})
INTERNAL_PREFIXES = ("/v2/models/", "/v2/repository/")
REALM = "courier"


class ApiKey(BaseModel):
    """One client's key as the server keeps it: a name (metrics, logs), the key's digest, scopes, a rate."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                      description="The client's name: a metric label, never secret.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key (`new-key` prints it).")
    scopes: list[Scope] = Field(min_length=1, description="public (/v1), internal (/v2 raw inference, metadata).")
    rate_per_s: float | None = Field(None, ge=0, description="Token-bucket refill per second (null: the "
                                     "default; 0: no limit, for operators' load tests).")
    burst: int | None = Field(None, gt=0, description="Bucket size: requests allowed at once (null: the default).")


class AuthArgs(BaseModel):
    """`args.auth` of the serve config: off locally, on in the chart (keys from its Secret)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Require a bearer API key on every route but the open ones.")
    keys_file: str | None = Field(None, description="A JSON or YAML list of keys (ApiKey), relative to the "
                                  "project root.")
    keys_env: str = Field("COURIER_API_KEYS", min_length=1, description="Environment variable holding the "
                          "same list as JSON (the chart sets it from its Secret); both sources are merged.")
    rate_per_s: float = Field(50, gt=0, description="Default refill of each key's bucket, per Ingress replica.")
    burst: int = Field(100, gt=0, description="Default bucket size, per Ingress replica.")


def client_headers(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """`Authorization: Bearer $COURIER_API_KEY` for Courier's own clients (the city, the load tests), or none."""
    key = environ.get("COURIER_API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def digest(key: str) -> str:
    """The hex SHA-256 the server stores for a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(args: AuthArgs, environ: dict[str, str] | os._Environ = os.environ) -> list[ApiKey]:
    """The keys of `keys_file` and of `$keys_env`; raises ValueError saying what to fix."""
    from serving.paths import resolve

    raw: list[Any] = []
    if args.keys_file:
        path = resolve(args.keys_file)
        if not path.is_file():
            raise ValueError(f"auth.keys_file {path} does not exist: create it (python -m serving.auth new-key) "
                             "or set auth.keys_file to null")
        raw += _as_list(yaml.safe_load(path.read_text()) or [], str(path))
    if environ.get(args.keys_env):
        try:
            raw += _as_list(json.loads(environ[args.keys_env]), f"${args.keys_env}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"${args.keys_env} is not JSON ({exc}): it holds a list of "
                             '{"name", "sha256", "scopes"} objects') from None
    try:
        keys = [ApiKey.model_validate(entry) for entry in raw]
    except ValidationError as exc:
        raise ValueError(f"an API key entry is invalid: {exc}") from None
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ValueError(f"API key names must be unique (they label the metrics), got {sorted(names)}")
    if args.enabled and not keys:
        raise ValueError(f"auth is enabled but no API key was found in auth.keys_file or ${args.keys_env}: "
                         "add one (python -m serving.auth new-key) or set auth.enabled to false")
    return keys


def _as_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must hold a list of API keys, got {type(value).__name__}")  # noqa: TRY004
    return value


class Unauthorized(CourierError):
    """401: no key, a malformed Authorization header, or a key nobody was given."""

    status = 401

    def __init__(self, message: str, error: str | None = None):
        super().__init__(message)
        challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
        self.headers = {"WWW-Authenticate": challenge}


class Forbidden(CourierError):
    """403: a valid key without the scope the route needs."""

    status = 403

    def __init__(self, message: str, scope: str):
        super().__init__(message)
        self.headers = {"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope", scope="{scope}"'}


class TooManyRequests(CourierError):
    """429: the key's bucket is empty; `Retry-After` says when one request will be admitted."""

    status = 429

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


def required_scope(path: str) -> Scope | None:
    """The scope a path needs; None for the open ones (probes, discovery)."""
    if path in OPEN_PATHS:
        return None
    if path.startswith(INTERNAL_PREFIXES):
        return "internal"
    return "public"


class TokenBuckets:
    """A token bucket per client: `rate` tokens a second up to `burst`; one request takes one token."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}  # name -> (tokens, monotonic time of that count)

    def take(self, name: str, rate: float, burst: int, now: float | None = None) -> float:
        """0 when a token was taken, else the seconds until one will be there (nothing is taken then)."""
        now = time.monotonic() if now is None else now
        tokens, then = self._state.get(name, (float(burst), now))
        tokens = min(float(burst), tokens + (now - then) * rate)
        if tokens >= 1.0:
            self._state[name] = (tokens - 1.0, now)
            return 0.0
        self._state[name] = (tokens, now)
        return (1.0 - tokens) / rate


class Authenticator:
    """Checks one request's key, scope and rate; raises Unauthorized, Forbidden or TooManyRequests."""

    def __init__(self, args: AuthArgs, keys: list[ApiKey], export_metrics: bool = True):
        self.args = args
        self.enabled = args.enabled
        self._keys = [(bytes.fromhex(k.sha256), k) for k in keys]
        self._buckets = TokenBuckets()
        self._refusals = _refusal_counter(export_metrics)

    @classmethod
    def from_config(cls, config: dict[str, Any] | None, export_metrics: bool = True) -> Authenticator:
        """From `args.auth` (None: off); the keys are read now, so a bad key file fails the replica's start."""
        args = AuthArgs.model_validate(config or {})
        return cls(args, load_keys(args) if args.enabled else [], export_metrics)

    def check(self, path: str, authorization: str | None) -> ApiKey | None:
        """The key admitted for `path` (None for an open path or with auth off)."""
        if not self.enabled:
            return None
        scope = required_scope(path)
        if scope is None:
            return None
        key = self._identify(authorization)
        if scope not in key.scopes:
            self._refused("scope", key.name)
            raise Forbidden(f"the API key {key.name!r} has scopes {key.scopes}; {path} needs the {scope!r} "
                            "scope: ask the operator for a key with it", scope)
        rate = self.args.rate_per_s if key.rate_per_s is None else key.rate_per_s
        if rate > 0:
            wait_s = self._buckets.take(key.name, rate, key.burst or self.args.burst)
            if wait_s > 0:
                self._refused("rate", key.name)
                retry = max(1, math.ceil(wait_s))  # Retry-After takes whole seconds
                raise TooManyRequests(f"rate limit of {rate:g} requests/s for {key.name!r} exceeded: "
                                      f"retry after {retry} s, and slow down", retry)
        return key

    def _identify(self, authorization: str | None) -> ApiKey:
        if not authorization:
            self._refused("missing", "unknown")
            raise Unauthorized("an API key is required: send `Authorization: Bearer <key>`")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self._refused("malformed", "unknown")
            raise Unauthorized("the Authorization header must be `Bearer <key>`", error="invalid_request")
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, key in self._keys:  # every digest compared, in constant time: no early exit
            if hmac.compare_digest(presented, stored):
                found = key
        if found is None:
            self._refused("invalid", "unknown")
            raise Unauthorized("the API key is not valid: check it, or ask the operator for a new one",
                               error="invalid_token")
        return found

    def _refused(self, reason: str, client: str) -> None:
        self._refusals.inc(tags={"reason": reason, "client": client})


def _refusal_counter(export: bool) -> Any:
    if not export:
        from serving.metrics import _Discard

        return _Discard()
    from ray.serve.metrics import Counter

    return Counter("courier_auth_refusals_total", tag_keys=("reason", "client"),
                   description="Requests refused by authentication (missing, malformed, invalid), scope or rate.")


def new_key(name: str, scopes: list[str], rate_per_s: float | None = None, burst: int | None = None) -> tuple[str, dict]:
    """(key, entry): a random 256-bit key, and the ApiKey entry to store (its digest, never the key)."""
    key = secrets.token_urlsafe(32)
    entry = ApiKey(name=name, sha256=digest(key), scopes=scopes, rate_per_s=rate_per_s, burst=burst)
    return key, entry.model_dump(exclude_none=True)


def main(argv: list[str] | None = None) -> None:
    """`new-key`: print a key and its entry (append the entry to the keys file or the Secret)."""
    parser = argparse.ArgumentParser(prog="python -m serving.auth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("new-key", help="a new key and the entry the server keeps")
    make.add_argument("--name", required=True)
    make.add_argument("--scopes", nargs="+", default=["public"], choices=["public", "internal"])
    make.add_argument("--rate-per-s", type=float, default=None)
    make.add_argument("--burst", type=int, default=None)
    make.add_argument("--append-to", type=Path, default=None, help="add the entry to this YAML keys file")
    args = parser.parse_args(argv)
    try:
        key, entry = new_key(args.name, args.scopes, args.rate_per_s, args.burst)
    except ValidationError as exc:
        raise SystemExit(f"serving.auth: {exc}") from None
    if args.append_to:
        existing = (yaml.safe_load(args.append_to.read_text()) or []) if args.append_to.exists() else []
        args.append_to.write_text(yaml.safe_dump([*existing, entry], sort_keys=False))
        print(f"entry appended to {args.append_to}", file=sys.stderr)
    else:
        print(json.dumps(entry))
    print(f"key (shown once, give it to the client): {key}", file=sys.stderr)


if __name__ == "__main__":
    main()
