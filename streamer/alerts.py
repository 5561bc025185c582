"""Alerts on standing questions: when one fires, the evidence it carries, where it is kept and sent.

- `AlertRule`: a standing question's condition (``alert_when`` an answer, or ``alert_on_change``) and
  hold-off, and what it last saw. `AlertRule.decide` is called with each periodic answer and says
  whether it fires. ``alert_when`` is edge-triggered: it fires when an answer comes to match after one
  that did not (or as the first answer), not again while the answers keep matching. ``alert_on_change``
  fires when an answer differs from the one before (compared as `protocol.normalize_answer` writes
  them; the first answer sets the baseline and fires nothing). Within ``hold_off_s`` of an alert, an
  answer that would fire is counted as ``suppressed`` and sends nothing, but still moves the baseline:
  a door that opened during the hold-off is not announced late, once it is over.
- `encode_jpeg`: an RGB picture as a JPEG of at most a given size (scaled down until it fits).
- `EvidenceStore` (``serve --evidence-dir``): each alert's pictures and its event (without the base64)
  as files, ``STREAM/YYYYmmdd-HHMMSS.mmm-QID.{jpg,strip.jpg,json}``, keeping the newest ``keep`` alerts
  (older ones are deleted as new ones come, those found on start included).
- `Webhook` (``serve --alert-webhook URL``): every alert event POSTed as JSON to a URL from a thread of
  its own, retried with exponential backoff; a bounded queue, so a dead receiver never holds the engine.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from mixmalmm.clients import protocol as P

from .redact import redact_uri

log = logging.getLogger("mixmalmm.alerts")

#: Alerts an evidence directory keeps by default (each is up to three files).
DEFAULT_EVIDENCE_KEEP = 500


# ---------------------------------------------------------------------------------------------------
# when an alert fires


@dataclass
class AlertRule:
    """A standing question's alert condition and what it has seen (see the module doc)."""

    alert_when: str | None = None
    alert_on_change: bool = False
    hold_off_s: float = P.DEFAULT_HOLD_OFF_S
    previous: str | None = None  # the last answer, as given
    matched: bool = False  # whether the last answer matched alert_when
    seen: bool = False  # an answer came before
    last_fired: float | None = None  # time.monotonic() of the last alert sent
    alerts: int = 0
    suppressed: int = 0

    @classmethod
    def from_request(cls, request: P.AddQuestion) -> AlertRule | None:
        if request.alert_when is None and not request.alert_on_change:
            return None
        hold = P.DEFAULT_HOLD_OFF_S if request.hold_off_s is None else float(request.hold_off_s)
        return cls(alert_when=request.alert_when, alert_on_change=request.alert_on_change, hold_off_s=hold)

    def settings(self) -> dict:
        """What a snapshot keeps of it: the condition and what it has seen, so that a restart or a move to
        another worker neither repeats an alert nor forgets a hold-off (its time as wall-clock seconds)."""
        fired = None if self.last_fired is None else time.time() - (time.monotonic() - self.last_fired)
        return {"alert_when": self.alert_when, "alert_on_change": self.alert_on_change, "hold_off_s": self.hold_off_s,
                "previous": self.previous, "matched": self.matched, "seen": self.seen, "last_fired_time_s": fired,
                "alerts": self.alerts, "suppressed": self.suppressed}

    @classmethod
    def from_settings(cls, saved: dict | None) -> AlertRule | None:
        if not saved:
            return None
        fired = saved.get("last_fired_time_s")
        return cls(alert_when=saved.get("alert_when"), alert_on_change=bool(saved.get("alert_on_change")),
                   hold_off_s=float(saved.get("hold_off_s", P.DEFAULT_HOLD_OFF_S)), previous=saved.get("previous"),
                   matched=bool(saved.get("matched")), seen=bool(saved.get("seen")),
                   last_fired=None if fired is None else time.monotonic() - max(0.0, time.time() - fired),
                   alerts=int(saved.get("alerts", 0)), suppressed=int(saved.get("suppressed", 0)))

    def decide(self, answer: str, now: float) -> tuple[str, str | None] | None:
        """Take one answer (at ``now``, monotonic seconds): (reason, previous answer) when it fires, else None.
        An answer with no letter or digit (the model said nothing) is no answer: it changes nothing."""
        if not P.normalize_answer(answer):
            return None
        previous, was_matched, seen = self.previous, self.matched, self.seen
        self.previous, self.seen = answer, True
        reason = None
        if self.alert_when is not None:
            self.matched = P.answer_matches(answer, self.alert_when)
            if self.matched and not (seen and was_matched):
                reason = "match"
        if reason is None and self.alert_on_change and seen and \
                P.normalize_answer(answer) != P.normalize_answer(previous or ""):
            reason = "change"
        if reason is None:
            return None
        if self.last_fired is not None and now - self.last_fired < self.hold_off_s:
            self.suppressed += 1
            return None
        self.last_fired = now
        self.alerts += 1
        return reason, previous if seen else None


# ---------------------------------------------------------------------------------------------------
# pictures


def encode_jpeg(rgb: np.ndarray, max_bytes: int = P.MAX_EVIDENCE_BYTES, quality: int = 85) -> bytes | None:
    """[H, W, 3] uint8 RGB as JPEG bytes of at most ``max_bytes``, scaled down as needed (None: it cannot be
    made that small, or encoded at all)."""
    import cv2

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    for _ in range(6):
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            return None
        if data.size <= max_bytes:
            return data.tobytes()
        scale = max(0.25, 0.9 * (max_bytes / data.size) ** 0.5)
        h, w = bgr.shape[:2]
        if min(h, w) * scale < 16:
            return None
        bgr = cv2.resize(bgr, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
    return None


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------------------
# the evidence directory

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class EvidenceStore:
    """Writes each alert's pictures and event under ``root`` and keeps the newest ``keep`` alerts."""

    def __init__(self, root: str | Path, keep: int = DEFAULT_EVIDENCE_KEEP):
        if keep < 1:
            raise ValueError(f"--evidence-keep must be >= 1, got {keep}")
        self.root = Path(root).resolve()  # events name their files by absolute paths
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)  # OSError: the caller says which option
        self._lock = threading.Lock()
        # Alerts kept, oldest first: the common path of their files (no suffix). Names sort by time.
        found = sorted((p for p in self.root.glob("*/*.json")), key=lambda p: p.name)
        self._kept: collections.deque[Path] = collections.deque(p.with_suffix("") for p in found)
        self.errors = 0
        self._prune()

    def write(self, event: P.AlertEvent, evidence: bytes | None, strip: bytes | None) -> P.AlertEvent:
        """Write the alert's files; the event returned names them (or says why they are missing)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(event.time_s)) + f".{int(event.time_s * 1000) % 1000:03d}"
        base = self.root / _SAFE.sub("_", event.stream) / f"{stamp}-{_SAFE.sub('_', event.question_id)}"
        paths = {"evidence_path": None, "strip_path": None}
        written: list[Path] = []
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            for key, data, suffix in (("evidence_path", evidence, ".jpg"), ("strip_path", strip, ".strip.jpg")):
                if data is not None:
                    paths[key] = str(_write_private(base.with_name(base.name + suffix), data, written))
            event = msgspec.structs.replace(event, **paths)
            record = msgspec.structs.replace(event, evidence_jpeg=None, strip_jpeg=None)
            _write_private(base.with_name(base.name + ".json"), P.encode(record), written)  # last: it marks them kept
        except OSError as exc:
            self.errors += 1
            for path in written:  # nothing half-kept: files that no .json names would never be deleted
                with contextlib.suppress(OSError):
                    path.unlink()
            log.error("could not write the evidence of an alert of %s/%s to '%s': %s", event.stream,
                      event.question_id, base.parent, exc)
            return msgspec.structs.replace(event, evidence_path=None, strip_path=None,
                                           evidence_error=f"could not write '{base}': {exc}")
        with self._lock:
            self._kept.append(base)
            self._prune()
        return event

    def _prune(self) -> None:
        while len(self._kept) > self.keep:
            old = self._kept.popleft()
            for suffix in (".jpg", ".strip.jpg", ".json"):
                try:
                    old.with_name(old.name + suffix).unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("could not delete old evidence '%s%s': %s", old, suffix, exc)

    def kept(self) -> int:
        with self._lock:
            return len(self._kept)


# ---------------------------------------------------------------------------------------------------
# the webhook


def _write_private(path: Path, data: bytes, written: list[Path]) -> Path:
    """Write a file readable by its owner only (camera pictures: as private as the snapshots)."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        written.append(path)
        f.write(data)
    return path


def check_webhook_url(url: str, insecure: bool = True) -> str:
    """An http(s) URL with a host (and a numeric port, if any), else ValueError saying what is wrong.
    Plain http:// to a host that is not loopback needs ``insecure`` (the alerts carry camera pictures)."""
    shown = redact_uri(url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--alert-webhook {shown!r}: expected an http:// or https:// URL with a host")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError(f"--alert-webhook {shown!r}: a URL has no spaces or control characters (write %20)")
    try:
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"--alert-webhook {shown!r}: {exc}") from None
    if parts.scheme == "http" and not insecure and not _loopback_host(parts.hostname):
        raise ValueError(f"--alert-webhook {shown!r}: refusing to send alerts (pictures) in plain HTTP off this "
                         "machine without --insecure; use https:// or a loopback receiver")
    return url


def _loopback_host(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class WebhookStats:
    sent: int = 0  # alerts delivered (2xx)
    failed: int = 0  # alerts given up after every attempt
    dropped: int = 0  # alerts dropped because the queue was full
    attempts: int = 0
    last_error: str | None = None


@dataclass
class Webhook:
    """POSTs alert events (JSON, `protocol.encode`) to ``url``; a publish sink (`publish` takes any event).

    Each alert is tried up to ``attempts`` times, waiting ``backoff_s``, 2x, 4x ... between tries; a 4xx
    other than 408/429 is not retried (the receiver refuses it). At most ``queue`` alerts wait; beyond,
    the oldest is dropped and counted.
    """

    url: str
    attempts: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 5.0
    queue: int = 100
    insecure: bool = True  # False (serve without --insecure): plain http:// only to loopback
    stats: WebhookStats = field(default_factory=WebhookStats)

    def __post_init__(self) -> None:
        check_webhook_url(self.url, self.insecure)
        self._pending: collections.deque[P.AlertEvent] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._deadline = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> Webhook:
        self._thread = threading.Thread(target=self._run, name="mixmalmm-webhook", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_s: float = 2.0) -> None:
        """Stop: the alerts waiting get one try each for up to ``drain_s`` seconds (a try under way ends its
        retries); those left then are counted as dropped and logged."""
        with self._cv:
            self._stop = True
            self._deadline = time.monotonic() + drain_s
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=drain_s + self.timeout_s + 1.0)
        with self._cv:
            left = len(self._pending)
            self._pending.clear()
        if left:
            self.stats.dropped += left
            log.error("alert webhook: %d alert(s) not delivered before shutdown", left)

    def publish(self, event) -> None:
        if not isinstance(event, P.AlertEvent):
            return
        with self._cv:
            if len(self._pending) >= self.queue:
                self._pending.popleft()
                self.stats.dropped += 1
                log.warning("alert webhook: queue full (%d), the oldest alert dropped", self.queue)
            self._pending.append(event)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if not self._pending or (self._stop and time.monotonic() > self._deadline):
                    return
                event = self._pending.popleft()
            try:
                self._deliver(event)
            except Exception:  # a bug: this alert is lost, the next ones are still sent
                self.stats.failed += 1
                log.exception("alert webhook: delivering an alert of %s/%s failed", event.stream, event.question_id)

    def _deliver(self, event: P.AlertEvent) -> None:
        body = P.encode(event)
        shown = redact_uri(self.url)
        attempt = 0
        while True:
            self.stats.attempts += 1
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "User-Agent": "mixmalmm-alerts"})
            retry = True
            try:
                with _OPENER.open(request, timeout=self.timeout_s) as reply:
                    reply.read()
                self.stats.sent += 1
                return
            except urllib.error.HTTPError as exc:
                self.stats.last_error = f"HTTP {exc.code} from {shown}"
                retry = not (300 <= exc.code < 500) or exc.code in (408, 429)  # a refusal or a redirect: final
            except Exception as exc:  # refused, timed out, not HTTP at all (http.client's errors are not OSError)
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                self.stats.last_error = f"{shown}: {reason}"
            attempt += 1
            if not retry or attempt >= self.attempts:
                break
            with self._cv:  # a stop ends the waiting and the retries
                if self._cv.wait_for(lambda: self._stop, timeout=self.backoff_s * 2 ** (attempt - 1)):
                    break
        self.stats.failed += 1
        log.error("alert webhook: %s/%s not delivered after %d attempt(s): %s", event.stream, event.question_id,
                  attempt, self.stats.last_error)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (urllib would re-send a POST as a GET without its body, and count it sent)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def evidence_pictures(shot, strip: np.ndarray | None) -> tuple[bytes | None, bytes | None]:
    """JPEGs of a Shot's composite and of a memory strip (each None when absent or too large)."""
    return (encode_jpeg(shot.image) if shot is not None else None,
            encode_jpeg(strip) if strip is not None else None)

