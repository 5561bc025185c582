"""Prometheus metrics scraped over real HTTP from an engine behind a real server, checked against status."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mixmalmm.clients import EngineError
from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM
from mixmalmm.streamer.engine import EngineConfig
from mixmalmm.streamer.metrics import EngineMetrics, parse_address

from .conftest import NUM_FRAMES, serving_engine, wait_for

EVERY_FRAME = P.ActionShotSettings(enabled=False, sample_fps=None)


@pytest.fixture(scope="module")
def model():
    return MALMM.tiny().eval()


def scrape(address) -> dict[str, dict[tuple, float]]:
    """name -> {labels (sorted items): value} of every sample, parsed by prometheus-client's own parser."""
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_scrape_during_a_run_matches_status(model, media, tmp_path):
    config = EngineConfig(state_dir=str(tmp_path / "state"), snapshot_period_s=3600)
    with serving_engine(model, config) as (engine, server, client):
        metrics = EngineMetrics(engine, server)
        try:
            address = metrics.serve("127.0.0.1", 0)
            assert address[1] > 0
            before = scrape(address)
            assert before["mixmalmm_streams"][()] == 0
            assert before["mixmalmm_snapshots_written_total"][()] == 0
            assert before["mixmalmm_process_resident_memory_bytes"][()] > 10 * 2**20
            client.add_stream("f", str(media.h264), mode="replay", pace="fast", actionshot=EVERY_FRAME)
            wait_for(lambda: client.status("f").streams[0].state == "finished", 60, "the file to finish")
            for _ in range(3):
                client.ask("f", "what colour is the square?", max_new_tokens=3)
            client.save_snapshot("f")
            status = client.status("f").streams[0]
            got = scrape(address)
            f = (("stream", "f"),)
            assert status.shots == NUM_FRAMES
            assert got["mixmalmm_stream_frames_total"][f] == status.frames == NUM_FRAMES
            assert got["mixmalmm_stream_shots_total"][f] == status.shots
            assert got["mixmalmm_stream_drops_total"][f] == status.drops == 0
            assert got["mixmalmm_stream_reconnects_total"][f] == 0
            assert got["mixmalmm_stream_queue_depth"][f] == status.queue_depth == 0
            assert got["mixmalmm_stream_memory_entries"][f] == status.memory_entries
            assert got["mixmalmm_stream_memory_span_seconds"][f] == pytest.approx(
                status.span_end_s - status.span_start_s)
            states = {dict(k)["state"]: v for k, v in got["mixmalmm_stream_state"].items()}
            assert states["finished"] == 1 and sum(states.values()) == 1
            assert got["mixmalmm_streams"][()] == 1
            # Latency: every answered question observed once, from its arrival (AskResult.latency_s).
            assert got["mixmalmm_question_latency_seconds_count"][()] == 3
            assert got["mixmalmm_questions_answered_total"][()] == 3
            assert 0 < got["mixmalmm_question_latency_seconds_sum"][()] < 60
            # Each model step of a batch of Shots is observed: at least NUM_FRAMES / max_batch of them.
            steps = got["mixmalmm_model_step_seconds_count"][()]
            assert NUM_FRAMES / config.max_batch <= steps <= NUM_FRAMES
            assert got["mixmalmm_model_step_seconds_bucket"][(("le", "+Inf"),)] == steps
            assert got["mixmalmm_snapshots_written_total"][()] == 1
            assert got["mixmalmm_snapshot_failures_total"][()] == 0
            assert 0 <= got["mixmalmm_snapshot_age_seconds"][()] < 30
            assert got["mixmalmm_requests_in_flight"][()] == 0
        finally:
            metrics.stop()
        assert engine.metrics is None


def test_a_failed_snapshot_is_counted(model, media, tmp_path):
    state = tmp_path / "state"
    config = EngineConfig(state_dir=str(state), snapshot_period_s=3600)
    with serving_engine(model, config) as (engine, server, client):
        metrics = EngineMetrics(engine, server)
        try:
            address = metrics.serve("127.0.0.1", 0)
            client.add_stream("f", str(media.h264), mode="replay", pace="fast", actionshot=EVERY_FRAME)
            wait_for(lambda: client.status("f").streams[0].shots > 0, 60, "a Shot")
            state.rmdir()
            state.write_text("not a directory")  # the snapshot's temporary file cannot be made (even as root)
            with pytest.raises(EngineError, match="could not save"):
                client.save_snapshot("f")
            got = scrape(address)
            assert got["mixmalmm_snapshot_failures_total"][()] == 1
            assert got["mixmalmm_snapshots_written_total"][()] == 0
        finally:
            metrics.stop()


@pytest.mark.parametrize("text", ["9108", "127.0.0.1:", "127.0.0.1:x", ":9108", "h:70000"])
def test_bad_addresses_name_the_option(text):
    with pytest.raises(ValueError, match="--metrics"):
        parse_address(text)
    assert parse_address("[::1]:9108") == ("::1", 9108)


@pytest.mark.parametrize(("address", "message"), [
    ("0.0.0.0:9108", "non-loopback address without --insecure"),
    ("localhost", "expected HOST:PORT"),
])
def test_serve_refuses_a_bad_metrics_bind_before_loading_the_model(address, message, capsys, tmp_path):
    from mixmalmm.streamer.cli import main

    # The weights folder does not exist: reaching the model load would be another error.
    code = main(["serve", "--metrics", address, "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("mixmalmm serve: --metrics")


def test_serve_process_serves_metrics_that_match_status(media, tmp_path):
    from .conftest import free_port
    from .test_serve import Serve, wait_status

    port = free_port()
    serve = Serve(tmp_path, f"f={media.h264}", "--metrics", f"127.0.0.1:{port}", "--no-actionshot",
                  "--sample-fps", "all", "--pace", "fast", "--mode", "replay")
    try:
        serve.wait_ready()
        with serve.client(timeout_s=30.0) as c:
            status = wait_status(c, "f", lambda s: s.state == "finished", 60, "the file to finish")
            c.ask("f", "what colour is the square?", max_new_tokens=3)
        got = scrape(("127.0.0.1", port))
        f = (("stream", "f"),)
        assert got["mixmalmm_stream_shots_total"][f] == status.shots == NUM_FRAMES
        assert got["mixmalmm_stream_frames_total"][f] == status.frames
        assert got["mixmalmm_question_latency_seconds_count"][()] == 1
        assert got["mixmalmm_model_step_seconds_count"][()] >= NUM_FRAMES / 8
        assert "metrics on http://127.0.0.1:" in serve.output()
    finally:
        serve.stop()
