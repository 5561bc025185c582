"""Many questions at once in the engine: waiting questions share one batched generation, get the answers
they get alone, and go before ingest steps (the tiny model, generated video files, synthetic streams)."""

from __future__ import annotations

import threading
import time

import pytest

from mixmalmm.clients import protocol as P
from mixmalmm.model import MALMM
from mixmalmm.streamer.engine import Engine, EngineConfig

from .conftest import NUM_FRAMES, wait_for

EVERY_FRAME = P.ActionShotSettings(enabled=False, sample_fps=None)


class Recorded:
    """A real model that records when each step and each batched generation ran (perf_counter seconds),
    and whose generations wait for `gate` while it is closed; the rest is the model's."""

    def __init__(self, model: MALMM):
        self.model = model
        self.steps: list[tuple[float, float]] = []
        self.generations: list[tuple[float, float, int, int, int]] = []  # start, end, rows, tokens, beams
        self.gate = threading.Event()
        self.gate.set()
        self.generating = threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def step(self, states, features, times):
        start = time.perf_counter()
        try:
            return self.model.step(states, features, times)
        finally:
            self.steps.append((start, time.perf_counter()))

    def generate_answers(self, outputs, questions, *, max_new_tokens, num_beams=1):
        start = time.perf_counter()
        self.generating.set()
        assert self.gate.wait(30), "the test never opened the gate"
        try:
            return self.model.generate_answers(outputs, questions, max_new_tokens=max_new_tokens, num_beams=num_beams)
        finally:
            self.generations.append((start, time.perf_counter(), len(questions), max_new_tokens, num_beams))

    def generate_answer(self, output, question, *, max_new_tokens, num_beams=1):
        return self.generate_answers([output], [question], max_new_tokens=max_new_tokens, num_beams=num_beams)[0]


@pytest.fixture(scope="module")
def tiny():
    return MALMM.tiny().eval()


def add(engine: Engine, sid: str, uri: str, pace: str = "fast") -> None:
    engine.add_stream(P.AddStream(id=0, stream=sid, uri=uri, pace=pace, actionshot=EVERY_FRAME))


def test_waiting_questions_share_one_generation_per_setting_and_get_their_own_answers(tiny, media):
    model = Recorded(tiny)
    engine = Engine(model, EngineConfig()).start()
    try:
        add(engine, "f", str(media.h264))
        engine.add_question(P.AddQuestion(id=1, stream="f", question_id="man", text="what is the man doing?"))
        stream = engine._get("f")
        wait_for(lambda: stream.state_name == "finished", 60, "the file to finish")
        results: dict[int, P.AskResult] = {}

        def ask(i: int, question: str, tokens: int, beams: int) -> None:
            results[i] = engine.ask("f", question, max_new_tokens=tokens, num_beams=beams)

        model.gate.clear()  # the first question's generation waits: the next ones queue up meanwhile
        first = threading.Thread(target=ask, args=(0, "is there a dog?", 6, 1))
        first.start()
        assert model.generating.wait(30)
        asked = [  # (question, max_new_tokens, num_beams): three generation settings, prompts of several lengths
            ("what is the man doing?", 6, 1), ("is there a cat?", 6, 1), ("what colour is the car?", 6, 1),
            ("who is holding the red ball now?", 6, 1), ("why?", 6, 1), ("is the dog running?", 6, 2),
            ("what is the woman holding?", 6, 2), ("where is the ball?", 3, 1),
        ]
        threads = [threading.Thread(target=ask, args=(i + 1, *a)) for i, a in enumerate(asked)]
        for t in threads:
            t.start()
        wait_for(lambda: len(engine._questions) == len(asked), 30, "every question waiting")
        model.gate.set()
        for t in [first, *threads]:
            t.join(timeout=60)
        assert len(results) == len(asked) + 1
        # One generation for the first question, then one per setting, the oldest question's setting first.
        assert [g[2:] for g in model.generations] == [(1, 6, 1), (5, 6, 1), (2, 6, 2), (1, 3, 1)]
        span = stream.state.time_span()
        for i, (question, tokens, beams) in enumerate([("is there a dog?", 6, 1), *asked]):
            alone = tiny.answer(stream.state, question, max_new_tokens=tokens, num_beams=beams)
            got = results[i]
            assert (got.question, got.answer, got.standing) == (question, alone.text, alone.mode == "standing")
            assert (got.span_start_s, got.span_end_s) == span
            assert got.question_id == ("man" if question == "what is the man doing?" else None)
        assert results[1].standing and not results[2].standing
    finally:
        engine.shutdown(save=False)


def test_questions_go_before_ingest_steps(tiny):
    model = Recorded(tiny)
    engine = Engine(model, EngineConfig()).start()
    try:
        for sid in ("a", "b"):  # two streams ingesting as fast as the model steps
            add(engine, sid, "synthetic:?num_frames=1000000&width=64&height=48&fps=25")
        wait_for(lambda: all(engine._get(s).state.frames > 3 for s in "ab"), 60, "both streams stepping")
        asks = []
        for i in range(8):
            start = time.perf_counter()
            engine.ask("ab"[i % 2], f"what happened {i}?", max_new_tokens=8)
            asks.append((start, time.perf_counter()))
        steps, generations = list(model.steps), list(model.generations)
        for g_start, g_end, *_ in generations:  # ingestion pauses while questions are answered
            assert not [s for s in steps if s[0] < g_end and s[1] > g_start], "a step ran during a generation"
        for a_start, a_end in asks:
            mine = [g for g in generations if a_start <= g[0] <= a_end]
            assert len(mine) == 1
            # it waited at most for the step under way and one more (a batch was generating when it came)
            assert len([s for s in steps if a_start <= s[0] <= mine[0][0]]) <= 1
        assert all(engine._get(s).state.frames > 10 for s in "ab")  # ingestion went on between questions
    finally:
        engine.shutdown(save=False)


def test_an_engine_not_running_refuses_questions(tiny, media):
    engine = Engine(tiny, EngineConfig())
    add(engine, "f", str(media.h264))
    try:
        with pytest.raises(P.RequestError) as err:
            engine.ask("f", "what moved?")
        assert err.value.code == P.ErrorCode.UNAVAILABLE and "not running" in err.value.message
        engine.start()
        wait_for(lambda: engine._get("f").state.frames == NUM_FRAMES, 60, "the file stepped")
        assert engine.ask("f", "what moved?", max_new_tokens=2).answer == tiny.answer(
            engine._get("f").state, "what moved?", max_new_tokens=2).text
    finally:
        engine.shutdown(save=False)
    with pytest.raises(P.RequestError) as err:
        engine.ask("f", "what moved?")
    assert err.value.code == P.ErrorCode.UNAVAILABLE
