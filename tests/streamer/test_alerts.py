"""Alerts on standing questions: when they fire (and are held off), their evidence (the last Shot and the
memory strip, in the event and in the evidence directory with its retention), the webhook with its
retries, and all of it through `mixmalmm serve`, `questions add` and `watch` as a user runs them.

The engine tests run the built-in model on the demo video of its synthetic world, at the file's own pace:
its answer to "how many shapes are there now?" changes as shapes come and go, so alerts really fire.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import msgspec
import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mixmalmm.clients import protocol as P
from mixmalmm.model import load_default_model
from mixmalmm.streamer.alerts import AlertRule, EvidenceStore, Webhook, encode_jpeg
from mixmalmm.streamer.demo import make_sample_video
from mixmalmm.streamer.engine import Engine, EngineConfig
from mixmalmm.streamer.metrics import EngineMetrics

from .conftest import free_port, wait_for

COUNT = "how many shapes are there now?"


# ---------------------------------------------------------------------------------------------------
# when an alert fires


def test_answers_match_as_whole_words_in_any_case_and_punctuation():
    assert P.normalize_answer("  Yes.  It IS -- open!") == "yes it is open"
    assert P.answer_matches("Yes, it is open", "yes")
    assert P.answer_matches("YES", "yes.")
    assert P.answer_matches("a red  car", "A red car")
    assert not P.answer_matches("yesterday", "yes")
    assert not P.answer_matches("no", "yes")
    assert not P.answer_matches("", "yes")


def test_alert_when_fires_on_the_edge_and_on_change_on_every_change_with_a_hold_off():
    rule = AlertRule(alert_when="yes", hold_off_s=0.0)
    fired = [rule.decide(a, t) for t, a in enumerate(["yes", "yes.", "no", "Yes, open", "yes", "no"])]
    assert fired == [("match", None), None, None, ("match", "no"), None, None]  # the first answer may fire
    assert (rule.alerts, rule.suppressed) == (2, 0)

    rule = AlertRule(alert_on_change=True, hold_off_s=0.0)
    fired = [rule.decide(a, t) for t, a in enumerate(["two", "Two!", "three", "two"])]
    assert fired == [None, None, ("change", "Two!"), ("change", "three")]  # the first answer is the baseline

    # Within the hold-off an alert is counted, not sent; the baseline still moves, so nothing fires late.
    rule = AlertRule(alert_when="yes", hold_off_s=10.0)
    assert rule.decide("yes", 0.0) == ("match", None)
    assert rule.decide("no", 1.0) is None
    assert rule.decide("yes", 2.0) is None  # would fire: held off
    assert rule.decide("yes", 20.0) is None  # still the same episode: no late alert
    assert rule.decide("no", 21.0) is None
    assert rule.decide("yes", 22.0) == ("match", "no")
    assert (rule.alerts, rule.suppressed) == (2, 1)


def test_an_empty_answer_neither_fires_nor_moves_the_baseline():
    rule = AlertRule(alert_when="yes", hold_off_s=0.0)
    assert [rule.decide(a, t) for t, a in enumerate(["yes", "", "...", "yes", "no", "yes"])] == [
        ("match", None), None, None, None, None, ("match", "no")]
    rule = AlertRule(alert_on_change=True, hold_off_s=0.0)
    assert [rule.decide(a, t) for t, a in enumerate(["two", "", "two", "three"])] == [None, None, None,
                                                                                     ("change", "two")]


def test_a_rule_restored_from_its_settings_goes_on_where_it_was():
    rule = AlertRule(alert_when="yes", hold_off_s=100.0)
    now = time.monotonic()
    assert rule.decide("yes", now) == ("match", None)
    assert rule.decide("no", now + 1) is None
    again = AlertRule.from_settings(json.loads(json.dumps(rule.settings())))  # as a snapshot keeps it
    assert (again.previous, again.matched, again.seen, again.alerts) == ("no", False, True, 1)
    assert again.decide("yes", time.monotonic()) is None and again.suppressed == 1  # the hold-off still runs
    fresh = AlertRule.from_settings({**rule.settings(), "last_fired_time_s": time.time() - 200.0})
    assert fresh.decide("yes", time.monotonic()) == ("match", "no")  # 200 s ago: the hold-off is over
    assert AlertRule.from_settings(None) is None


def test_add_question_refuses_an_alert_without_a_period():
    with pytest.raises(ValueError, match="needs period_s"):
        P.AddQuestion(id=1, stream="s", question_id="q", text="t", alert_on_change=True)
    with pytest.raises(ValueError, match="needs alert_when or alert_on_change"):
        P.AddQuestion(id=1, stream="s", question_id="q", text="t", period_s=1.0, hold_off_s=5.0)
    body = b'{"type": "add_question", "id": 3, "stream": "s", "question_id": "q", "text": "t", "alert_when": "yes"}'
    with pytest.raises(P.RequestError) as refused:
        P.decode_request(body)
    assert refused.value.code == P.ErrorCode.BAD_REQUEST and "period_s" in refused.value.message
    body = b'{"type": "add_question", "id": 3, "stream": "s", "question_id": "q", "text": "t", "period_s": 1, "alert_when": "?!"}'
    with pytest.raises(P.RequestError, match="no letter or digit"):
        P.decode_request(body)


# ---------------------------------------------------------------------------------------------------
# pictures and the evidence directory


def test_evidence_jpeg_is_scaled_down_to_fit_the_bound():
    noise = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)  # JPEG's worst case
    data = encode_jpeg(noise)
    assert data is not None and len(data) <= P.MAX_EVIDENCE_BYTES
    picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[1] < 1920 and abs(picture.shape[1] / picture.shape[0] - 1920 / 1080) < 0.01
    small = np.zeros((120, 160, 3), np.uint8)
    small[:, :80] = (255, 0, 0)  # RGB red on the left
    picture = cv2.imdecode(np.frombuffer(encode_jpeg(small), np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (120, 160, 3)
    assert tuple(picture[60, 20]) == pytest.approx((0, 0, 255), abs=8)  # BGR on disk: the colours kept
    assert encode_jpeg(noise, max_bytes=100) is None  # cannot be made that small: no picture, no error


def _alert(i: int, stream: str = "cam") -> P.AlertEvent:
    return P.AlertEvent(stream=stream, question_id="door", question="is the door open?", answer="yes",
                        reason="match", alert_when="yes", time_s=1_700_000_000.0 + i)


def test_evidence_store_keeps_the_newest_alerts_across_restarts(tmp_path):
    store = EvidenceStore(tmp_path / "ev", keep=3)
    picture = encode_jpeg(np.full((32, 48, 3), 200, np.uint8))
    written = [store.write(_alert(i), picture, picture if i % 2 else None) for i in range(5)]
    assert all(e.evidence_path and Path(e.evidence_path).read_bytes() == picture for e in written[2:])
    assert [bool(e.strip_path) for e in written] == [False, True, False, True, False]
    left = sorted(p.name for p in (tmp_path / "ev" / "cam").iterdir())
    assert len([n for n in left if n.endswith(".json")]) == 3
    assert not any(Path(e.evidence_path).exists() for e in written[:2])  # the two oldest deleted, every file
    record = msgspec.json.decode((Path(written[-1].evidence_path).with_suffix(".json")).read_bytes(), type=P.AlertEvent)
    assert record.evidence_jpeg is None and record.evidence_path == written[-1].evidence_path
    assert store.kept() == 3
    again = EvidenceStore(tmp_path / "ev", keep=1)  # a restart with a smaller bound prunes what it finds
    assert again.kept() == 1 and Path(written[-1].evidence_path).exists()
    assert not Path(written[-2].evidence_path).exists()


def test_an_evidence_write_that_fails_is_said_in_the_event_and_leaves_nothing_behind(tmp_path):
    store = EvidenceStore(tmp_path / "ev", keep=3)
    (tmp_path / "ev" / "cam").write_text("a file where the stream's folder would go")
    event = store.write(_alert(0), b"jpeg", None)
    assert event.evidence_path is None and "could not write" in event.evidence_error
    assert store.errors == 1 and store.kept() == 0
    good = store.write(_alert(1, stream="other"), b"jpeg", None)  # another stream's goes on
    assert Path(good.evidence_path).is_absolute() and Path(good.evidence_path).stat().st_mode & 0o777 == 0o600
    # Failing half-way (the picture written, then the strip cannot be): the picture is removed again.
    event = _alert(3, stream="half")
    stamp = Path(store.write(event, b"jpeg", None).evidence_path)
    for suffix in (".jpg", ".json"):
        stamp.with_suffix(suffix).unlink()
    stamp.with_name(stamp.name.replace(".jpg", ".strip.jpg")).mkdir()  # the strip's name is taken by a folder
    failed = store.write(event, b"jpeg", b"strip")
    assert failed.evidence_path is None and failed.strip_path is None and failed.evidence_error
    assert not stamp.exists() and not stamp.with_suffix(".json").exists()  # the picture written first: removed


# ---------------------------------------------------------------------------------------------------
# the webhook


class Receiver:
    """A real HTTP server on 127.0.0.1 that answers the POSTs with the statuses given, then 200."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.bodies: list[bytes] = []
        self.types: list[str] = []
        receiver = self

        class Handle(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the base class's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.bodies.append(body)
                receiver.types.append(self.headers["Content-Type"])
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handle)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_webhook_retries_with_backoff_and_gives_up_on_a_refusal():
    receiver = Receiver([503, 500, 200, 400])
    hook = Webhook(receiver.url, attempts=4, backoff_s=0.05, timeout_s=5.0).start()
    try:
        began = time.monotonic()
        hook.publish(_alert(0))
        hook.publish(P.AnswerEvent(stream="cam", question_id="door", question="q", answer="yes"))  # not an alert
        wait_for(lambda: hook.stats.sent == 1, 10, "the alert delivered on the third try")
        assert time.monotonic() - began >= 0.05 + 0.1  # waited 0.05 s, then 0.1 s
        assert len(receiver.bodies) == 3 and receiver.types == ["application/json"] * 3
        assert P.decode_event(receiver.bodies[-1]) == _alert(0)
        hook.publish(_alert(1))  # 400: the receiver refuses it, no retry
        wait_for(lambda: hook.stats.failed == 1, 10, "the refused alert given up")
        assert len(receiver.bodies) == 4 and hook.stats.last_error.startswith("HTTP 400")
    finally:
        hook.stop()
        receiver.close()
    dead = Webhook(f"http://127.0.0.1:{free_port()}/hook", attempts=3, backoff_s=0.01).start()
    try:
        dead.publish(_alert(2))
        wait_for(lambda: dead.stats.failed == 1, 10, "an unreachable receiver given up")
        assert dead.stats.attempts == 3 and dead.stats.sent == 0
    finally:
        dead.stop()
    with pytest.raises(ValueError, match="http:// or https://"):
        Webhook("ftp://example.com/x")
    for url, message in (("http://h:abc/x", "Port could not be cast"), ("http://h/a b", "no spaces"),
                         ("http://10.0.0.5/hook", "without --insecure")):
        with pytest.raises(ValueError, match=message):
            Webhook(url, insecure=False)
    assert Webhook("https://10.0.0.5/hook", insecure=False) and Webhook("http://localhost:9/x", insecure=False)
    with pytest.raises(ValueError) as shown:
        Webhook("ftp://user:secret@example.com/x")
    assert "secret" not in str(shown.value)


class Garbage:
    """A TCP server on 127.0.0.1 whose first `bad` connections get bytes that are not HTTP (a TLS alert),
    the next ones a plain HTTP 200."""

    def __init__(self, bad: int):
        self.bad, self.connections = bad, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    request = b""
                    while b"\r\n\r\n" not in request:  # the whole request, so that closing sends no reset
                        request += conn.recv(65536)
                    head, _, body = request.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(body) < length:
                        body += conn.recv(65536)
                    self.connections += 1
                    conn.sendall(b"\x15\x03\x01\x00\x02\x02\x50" if self.connections <= self.bad
                                 else b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self):
        self.listener.close()


def test_a_reply_that_is_not_http_is_retried_and_the_webhook_goes_on():
    garbage = Garbage(bad=3)
    hook = Webhook(garbage.url, attempts=3, backoff_s=0.01).start()
    try:
        hook.publish(_alert(0))  # three tries, three garbage replies: given up, counted
        wait_for(lambda: hook.stats.failed == 1, 10, "the alert given up")
        assert hook.stats.attempts == 3 and "BadStatusLine" in hook.stats.last_error
        hook.publish(_alert(1))  # the thread is still there: the next alert goes out
        wait_for(lambda: hook.stats.sent == 1, 10, "the next alert delivered")
    finally:
        hook.stop()
        garbage.close()


def test_a_redirect_is_not_followed_and_stop_drops_what_cannot_be_sent_in_time():
    receiver = Receiver([302])
    hook = Webhook(receiver.url, attempts=5, backoff_s=0.01).start()
    try:
        hook.publish(_alert(0))
        wait_for(lambda: hook.stats.failed == 1, 10, "the redirected alert given up")
        assert len(receiver.bodies) == 1 and hook.stats.last_error.startswith("HTTP 302")
    finally:
        hook.stop()
        receiver.close()
    dead = Webhook(f"http://127.0.0.1:{free_port()}/hook", attempts=5, backoff_s=10.0)  # long backoffs
    for i in range(3):
        dead.publish(_alert(i))
    dead.start()
    wait_for(lambda: dead.stats.attempts >= 1, 10, "the first try")
    began = time.monotonic()
    dead.stop(drain_s=0.5)  # ends the backoff at once; what is left is counted, not waited for
    assert time.monotonic() - began < 5.0
    assert dead.stats.failed + dead.stats.dropped == 3 and dead.stats.sent == 0


def test_a_full_webhook_queue_drops_the_oldest_alert():
    receiver = Receiver()
    hook = Webhook(receiver.url, queue=2)  # not started: nothing is sent, the queue fills
    for i in range(4):
        hook.publish(_alert(i))
    assert hook.stats.dropped == 2
    hook.start()
    wait_for(lambda: hook.stats.sent == 2, 10, "the two newest alerts")
    hook.stop()
    receiver.close()
    assert [P.decode_event(b).time_s for b in receiver.bodies] == [_alert(2).time_s, _alert(3).time_s]


# ---------------------------------------------------------------------------------------------------
# the engine, on the demo video


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_sample_video(tmp_path_factory.mktemp("demo"))


def _expected(answers: list[str], rule: AlertRule) -> list[tuple[str, str | None, str]]:
    """What the documented rule makes of a question's answers (one per second apart: no hold-off bites)."""
    return [(*fired, a) for t, a in enumerate(answers) if (fired := rule.decide(a, 1000.0 * t))]


def test_alerts_fire_with_their_evidence_and_are_kept_in_the_evidence_dir(demo, tmp_path):
    events: list = []
    config = EngineConfig(evidence_dir=str(tmp_path / "evidence"), evidence_keep=2, state_dir=str(tmp_path / "state"))
    engine = Engine(load_default_model(), config, publish=events.append).start()
    try:
        engine.add_stream(P.AddStream(id=0, stream="demo", uri=str(demo.path), mode="replay", pace="realtime"))
        add = [P.AddQuestion(id=0, stream="demo", question_id="n", text=COUNT, period_s=0.4, alert_on_change=True,
                             hold_off_s=0.0),
               P.AddQuestion(id=0, stream="demo", question_id="three", text=COUNT, period_s=0.4, alert_when="Three",
                             hold_off_s=0.0),
               P.AddQuestion(id=0, stream="demo", question_id="held", text=COUNT, period_s=0.4,
                             alert_on_change=True, hold_off_s=600.0)]
        for request in add:
            engine.add_question(request)
        stream = engine._get("demo")
        wait_for(lambda: stream.state_name == "finished", 60, "the video played")
        time.sleep(1.0)  # a few answers on the whole video
        infos = {q.question_id: q for q in engine.stream_info(stream).questions}
        shot = stream.latest_shot.image
        scraped = {(s.name, s.labels.get("question")): s.value
                   for family in text_string_to_metric_families(generate_latest(EngineMetrics(engine).registry).decode())
                   for s in family.samples if s.name.startswith("mixmalmm_alerts")}
    finally:
        engine.shutdown(save=True)

    answers = {qid: [e.answer for e in events if isinstance(e, P.AnswerEvent) and e.question_id == qid]
               for qid in ("n", "three", "held")}
    alerts = {qid: [e for e in events if isinstance(e, P.AlertEvent) and e.question_id == qid]
              for qid in ("n", "three", "held")}
    # The shapes come and go: the count changes at least twice, and "three" is reached.
    assert len(set(answers["n"])) >= 2, answers["n"]
    want_n = _expected(answers["n"], AlertRule(alert_on_change=True, hold_off_s=0.0))
    assert len(want_n) >= 2
    assert [(e.reason, e.previous, e.answer) for e in alerts["n"]] == want_n
    want_three = _expected(answers["three"], AlertRule(alert_when="Three", hold_off_s=0.0))
    assert len(want_three) >= 1 and [(e.reason, e.previous, e.answer) for e in alerts["three"]] == want_three
    assert all(P.answer_matches(e.answer, "three") and e.alert_when == "Three" for e in alerts["three"])
    # The hold-off of 600 s: the first change is sent, every later one counted.
    changes = len(_expected(answers["held"], AlertRule(alert_on_change=True, hold_off_s=0.0)))
    assert len(alerts["held"]) == 1 and infos["held"].suppressed == changes - 1 >= 1
    assert (infos["n"].alerts, infos["n"].suppressed, infos["n"].hold_off_s) == (len(want_n), 0, 0.0)
    assert scraped[("mixmalmm_alerts_total", "n")] == len(want_n)
    assert scraped[("mixmalmm_alerts_suppressed_total", "held")] == changes - 1

    everything = alerts["n"] + alerts["three"] + alerts["held"]
    for alert in everything:
        # each alert comes right after the answer that fired it, with the same span
        before = events[events.index(alert) - 1]
        assert isinstance(before, P.AnswerEvent) and before.question_id == alert.question_id
        assert (before.answer, before.span_end_s) == (alert.answer, alert.span_end_s)
        # the evidence: the memory's last Shot (its end is the memory's end), at the Shot's size
        assert alert.shot_end_s == alert.span_end_s and alert.shot_start_s <= alert.shot_end_s
        picture = cv2.imdecode(np.frombuffer(base64.b64decode(alert.evidence_jpeg), np.uint8), cv2.IMREAD_COLOR)
        assert picture.shape == shot.shape and picture.std() > 5
        strip = cv2.imdecode(np.frombuffer(base64.b64decode(alert.strip_jpeg), np.uint8), cv2.IMREAD_COLOR)
        assert strip.shape[1] > 2 * strip.shape[0] and strip.std() > 5  # one row of thumbnails
        assert len(P.encode(alert)) < P.MAX_MESSAGE_BYTES and alert.evidence_error is None
    # the evidence directory keeps the newest two alerts, with both pictures and the event
    assert all(e.evidence_path and e.strip_path for e in everything)
    newest = sorted(everything, key=lambda e: e.time_s)[-2:]
    kept = sorted(p.name for p in (tmp_path / "evidence" / "demo").iterdir())
    assert kept == sorted(Path(p).name for e in newest for p in (e.evidence_path, e.strip_path,
                                                                   Path(e.evidence_path).with_suffix(".json")))
    for e in newest:
        assert Path(e.evidence_path).read_bytes() == base64.b64decode(e.evidence_jpeg)
        saved = json.loads(Path(e.evidence_path).with_suffix(".json").read_text())
        assert saved["answer"] == e.answer and saved["evidence_jpeg"] is None

    # The snapshot keeps the alert settings and what they have seen: a restart (or a cluster's move) goes on
    # where they were, so an answer that has not changed fires nothing again and the hold-off still runs.
    restored_events: list = []
    restored = Engine(load_default_model(), EngineConfig(state_dir=str(tmp_path / "state")),
                      publish=restored_events.append).start(restore=True)
    try:
        again = {q.question_id: q for q in restored.stream_info(restored._get("demo")).questions}
        assert (again["three"].alert_when, again["three"].hold_off_s) == ("Three", 0.0)
        assert (again["held"].alert_on_change, again["held"].hold_off_s, again["held"].alerts,
                again["held"].suppressed) == (True, 600.0, 1, changes - 1)
        assert again["n"].period_s == 0.4 and again["n"].alerts == len(want_n)
        # a restored stream has no Shot of its own yet: no memory sheet to draw
        assert restored.memory_sheet("demo") is None
        wait_for(lambda: sum(isinstance(e, P.AnswerEvent) for e in restored_events) >= 6, 30, "answers after the restart")
        assert [e.answer for e in restored_events if isinstance(e, P.AnswerEvent)][-1] == answers["n"][-1]
        assert not [e for e in restored_events if isinstance(e, P.AlertEvent)]  # the same answer: no alert again
    finally:
        restored.shutdown(save=False)


# ---------------------------------------------------------------------------------------------------
# as a user runs it


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixmalmm.clients.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_serve_alerts_reach_watch_the_webhook_and_the_evidence_dir(demo, tmp_path):
    from .test_serve import Serve

    receiver = Receiver([503])  # the first try fails: the retry delivers it
    evidence = tmp_path / "evidence"
    serve = Serve(tmp_path, "--evidence-dir", str(evidence), "--alert-webhook", receiver.url)
    events = serve.process.args[serve.process.args.index("--events") + 1]
    try:
        serve.wait_ready()
        watch = subprocess.Popen([sys.executable, "-m", "mixmalmm.clients.cli", "watch", "demo", "--events", events],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # watch's SUB socket joins
        added = cli("streams", "add", "demo", str(demo.path), "--server", serve.endpoint, "--pace", "realtime")
        assert added.returncode == 0, added.stderr
        q = cli("questions", "add", "demo", "n", COUNT, "--period", "0.5", "--alert-on-change", "--hold-off", "0",
                "--server", serve.endpoint)
        assert q.returncode == 0 and "alert when answer changes, hold-off 0 s" in q.stdout, (q.stdout, q.stderr)
        wait_for(lambda: len(receiver.bodies) >= 2, 60, "an alert at the webhook, tried twice")
        listed = cli("streams", "list", "--server", serve.endpoint)
        assert re.search(r"alert when answer changes, hold-off 0 s \(\d+ sent, 0 held off\)", listed.stdout), listed.stdout
        time.sleep(0.5)
        watch.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = watch.communicate(timeout=30)
    finally:
        serve.stop()
        receiver.close()
    lines = [line for line in out.splitlines() if " ALERT " in line]
    assert lines, out + err
    assert f"ALERT n ({COUNT}):" in lines[0] and "(answer changed from '" in lines[0]
    assert "last Shot" in lines[0] and "KiB JPEG; memory strip; saved " + str(evidence) in lines[0]
    delivered = [P.decode_event(b) for b in receiver.bodies]
    assert len(delivered) >= 2 and delivered[0] == delivered[1]  # 503, then the same alert again
    alert = delivered[0]
    assert isinstance(alert, P.AlertEvent) and alert.reason == "change" and alert.evidence_jpeg
    assert Path(alert.evidence_path).is_file() and Path(alert.evidence_path).is_relative_to(evidence)


def test_serve_refuses_bad_alert_options_in_one_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    for args, message in ((["--alert-webhook", "mailto:x@example.com"], "expected an http:// or https:// URL"),
                          (["--evidence-dir", str(blocked / "ev")], "--evidence-dir"),
                          (["--evidence-keep", "0"], "evidence_keep (serve --evidence-keep) must be >= 1")):
        done = cli("serve", "--bind", f"tcp://127.0.0.1:{free_port()}", *args, timeout=60)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
