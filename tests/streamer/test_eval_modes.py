"""`mixmalmm eval --mode stream|both`: the streaming engine path on MA-LMM's data, and its distance to the
clip algorithm, on a tiny MSVD-QA-format dataset written here (generated H.264 videos, the built-in model)."""

import json

from mixmalmm.model.datasets import DATASETS, read_items
from mixmalmm.model.metrics import is_correct
from mixmalmm.streamer.evaluate import configure, run_modes
from mixmalmm.streamer.options import builtin_model

from .test_eval import media, run, write_annotations  # noqa: F401  (media: the module's fixture)


def test_stream_mode_end_to_end(media, tmp_path):  # noqa: F811
    annotations = write_annotations(tmp_path, "msvd-qa")
    proc = run(["msvd-qa", "--annotations", str(annotations), "--videos", str(media / "videos"), "--num-frames", "6",
                "--memory-bank-length", "3", "--mode", "stream", "--out", str(tmp_path / "r.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["mode"] == "stream" and set(report["modes"]) == {"stream"} and "distance" not in report
    assert report["settings"]["ingest"]["enabled"] is False and report["settings"]["ingest"]["sample_fps"] is None
    assert report["items"] == 4
    for p in report["predictions"]:
        assert p["correct"] == is_correct(p["prediction"], p["answer"], first_word=True)
    assert report["modes"]["stream"]["top1"] == report["top1"]
    assert "stream " in proc.stdout and "mode" in proc.stdout


def test_both_modes_agree_and_report_the_distance(media, tmp_path):  # noqa: F811
    """vidA is asked two questions (one stream, two standing questions; --max-standing 1: two streams)."""
    annotations = write_annotations(tmp_path, "msvd-qa")
    proc = run(["msvd-qa", "--annotations", str(annotations), "--videos", str(media / "videos"), "--num-frames", "12",
                "--memory-bank-length", "3", "--mode", "both", "--max-standing", "1", "--num-beams", "1",
                "--out", str(tmp_path / "r.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    d = report["distance"]
    assert d["answer_agreement"] == 100.0 and d["answers_equal"] == 4
    assert 0 <= d["query_output_rel_diff_mean"] <= d["query_output_rel_diff_max"] < 1e-4  # fp32 rounding only
    preds = report["predictions"]
    assert all(p["stream_prediction"] == p["prediction"] for p in preds)
    assert max(p["query_output_rel_diff"] for p in preds) == d["query_output_rel_diff_max"]
    assert report["modes"]["clip"]["top1"] == report["modes"]["stream"]["top1"] == report["top1"]
    assert "100.0 % identical answers (4 of 4)" in proc.stdout


def test_actionshot_makes_the_stream_differ(media, tmp_path):  # noqa: F811
    """Blending frames into composites changes what the memory holds: the distance sees it."""
    spec = DATASETS["msvd-qa"]
    items = read_items(spec, write_annotations(tmp_path, "msvd-qa"), num_frames=12)
    model = builtin_model().eval()
    configure(model, spec, 3)
    from mixmalmm.clients import protocol as P
    from mixmalmm.streamer.evaluate import stream_ingest

    plain = run_modes(model, items, "both", videos=media / "videos", num_beams=1, max_new_tokens=5)
    blended = run_modes(model, items, "both", videos=media / "videos", num_beams=1, max_new_tokens=5,
                        actionshot=stream_ingest(model, P.ActionShotSettings(enabled=True)))
    assert plain.clip == blended.clip == plain.stream
    assert max(plain.differences) < 1e-4
    assert max(blended.differences) > 1e-2


def test_clip_mode_refuses_actionshot_options(media, tmp_path):  # noqa: F811
    annotations = write_annotations(tmp_path, "msvd-qa")
    proc = run(["msvd-qa", "--annotations", str(annotations), "--videos", str(media / "videos"), "--actionshot"],
               tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mixmalmm eval: the ActionShot options (--actionshot, --step, --sample-fps, ...) are for --mode stream or both"]
