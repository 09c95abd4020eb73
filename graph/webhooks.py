"""Job webhooks: when an async job ends, POST its job object to the ``webhook_url`` it was created with.

Each delivery is signed, so a receiver can check it came from this server and was not replayed:

    X-Lorafleet-Timestamp: 1764460800
    X-Lorafleet-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + body, keyed by jobs.webhook_secret>
    X-Lorafleet-Delivery:  <id, the same on every retry of one delivery>

Receivers should recompute the signature over the raw body, compare in constant time, and refuse
timestamps older than a few minutes. The body is ``{"event": "job.done" | "job.failed" |
"job.cancelled", "job": <the job object of GET /v1/jobs/{id}, with images when done>}``.

A delivery is retried with exponential backoff (``backoff_s``, doubling) on connection errors,
timeouts, 408, 429 and 5xx answers, up to ``max_attempts`` tries; any other 4xx ends it at once
(the receiver refused it). Deliveries run in the Jobs replica, off its event loop; they are not
persisted, so a delivery in flight when that replica stops is not retried by the next one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
SECRET_ENV = "LORAFLEET_WEBHOOK_SECRET"


def check_webhook_url(url: str) -> str | None:
    """Why ``url`` cannot be a webhook target (None if it can): an absolute http(s) URL with a host."""
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters, got {len(url)}"
    if not url.isascii() or any(c.isspace() for c in url):
        return "must be an ASCII URL without spaces"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http:// or https:// URL"
    return None


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``"<timestamp>." + body``."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver does (constant-time compare); used by the tests."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def _urllib_post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST; the HTTP status (an error status too). Blocking: run it in a thread."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - http(s) only
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _retryable(status: int | None) -> bool:
    return status is None or status in (408, 429) or status >= 500


@dataclass
class WebhookSender:
    """Delivers signed job webhooks with retries (``deliver``); counts outcomes."""

    secret: bytes
    max_attempts: int = 5
    timeout_s: float = 10.0
    backoff_s: float = 1.0
    post: Callable[[str, bytes, dict[str, str], float], int] = _urllib_post
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.time
    delivered: int = 0
    failed: int = 0
    attempts: list[tuple[str, int | None]] = field(default_factory=list)  # (delivery id, status) of recent tries

    async def deliver(self, url: str, event: str, job: dict) -> bool:
        """POST ``{"event", "job"}`` to ``url`` until a 2xx (True) or a refusal / the last try (False)."""
        body = json.dumps({"event": event, "job": job}, separators=(",", ":")).encode()
        delivery = secrets.token_hex(8)
        for attempt in range(1, self.max_attempts + 1):
            timestamp = str(int(self.clock()))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "lorafleet-webhooks",
                "X-Lorafleet-Event": event,
                "X-Lorafleet-Delivery": delivery,
                "X-Lorafleet-Attempt": str(attempt),
                "X-Lorafleet-Timestamp": timestamp,
                "X-Lorafleet-Signature": sign(self.secret, timestamp, body),
            }
            try:
                status: int | None = await asyncio.to_thread(self.post, url, body, headers, self.timeout_s)
            except (OSError, ValueError):  # refused, unreachable, timed out, bad URL
                status = None
            self.attempts = [*self.attempts[-99:], (delivery, status)]
            if status is not None and 200 <= status < 300:
                self.delivered += 1
                return True
            if not _retryable(status) or attempt == self.max_attempts:
                break
            await self.sleep(self.backoff_s * 2 ** (attempt - 1))
        self.failed += 1
        return False
