"""A small real handler standing in for the engine in the client and command-line transport tests."""

import threading
import time

from mixmalmm.clients import protocol as p


class StoreEngine:
    """Streams and standing questions kept in dicts, answers made from the question (``seen: `` and the
    question reversed), status numbers fixed so that the tables can be checked; records every request it
    handles in ``requests`` (so a test can check what travelled: ``num_beams``, ActionShot settings)."""

    def __init__(self) -> None:
        self.streams: dict[str, p.StreamInfo] = {}
        self.requests: list[p.Request] = []
        self.lock = threading.Lock()

    @staticmethod
    def answer(question: str) -> str:
        """The answer this handler gives to ``question``."""
        return f"seen: {question[::-1]}"

    def handle(self, request, arrived):
        with self.lock:
            self.requests.append(request)
            return self._handle(request)

    def asks(self) -> list[p.Ask]:
        """The Ask requests handled so far, in order."""
        with self.lock:
            return [r for r in self.requests if isinstance(r, p.Ask)]

    def _stream(self, stream_id: str) -> p.StreamInfo:
        if stream_id not in self.streams:
            raise p.RequestError(p.ErrorCode.UNKNOWN_STREAM, f"no stream {stream_id!r}")
        return self.streams[stream_id]

    def _handle(self, r):
        if isinstance(r, p.AddStream):
            if r.stream in self.streams:
                raise p.RequestError(p.ErrorCode.ALREADY_EXISTS, f"stream {r.stream!r} exists")
            mode = r.mode
            if mode == "auto":  # as the protocol says: replay for files, live otherwise
                mode = "live" if r.uri.startswith(("rtsp://", "http://", "https://", "webcam:")) else "replay"
            info = p.StreamInfo(stream=r.stream, uri=r.uri, state="connecting", mode=mode)
            self.streams[r.stream] = info
            return info
        if isinstance(r, p.RemoveStream):
            info = self.streams.pop(self._stream(r.stream).stream)
            return p.StreamInfo(stream=info.stream, uri=info.uri, state="stopped", mode=info.mode)
        if isinstance(r, p.ListStreams):
            return p.ListStreamsResult(streams=list(self.streams.values()))
        if isinstance(r, p.AddQuestion):
            alert = r.alert_when is not None or r.alert_on_change
            question = p.StandingQuestion(
                stream=r.stream, question_id=r.question_id, text=r.text, period_s=r.period_s,
                alert_when=r.alert_when, alert_on_change=r.alert_on_change,
                hold_off_s=(p.DEFAULT_HOLD_OFF_S if r.hold_off_s is None else r.hold_off_s) if alert else None)
            self._stream(r.stream).questions.append(question)
            return question
        if isinstance(r, p.RemoveQuestion):
            info = self._stream(r.stream)
            for question in info.questions:
                if question.question_id == r.question_id:
                    info.questions.remove(question)
                    return question
            raise p.RequestError(p.ErrorCode.UNKNOWN_QUESTION, f"no question {r.question_id!r} on {r.stream!r}")
        if isinstance(r, p.Ask):
            info = self._stream(r.stream)
            standing = next((q for q in info.questions if q.text == r.question), None)
            return p.AskResult(stream=r.stream, question=r.question, answer=self.answer(r.question),
                               standing=standing is not None, question_id=standing and standing.question_id,
                               span_start_s=2.5, span_end_s=75.25, latency_s=0.125)
        if isinstance(r, p.Status):
            streams = [p.StreamStatus(stream=s.stream, uri=s.uri, state="live", fps_in=25.0, fps_out=2.5,
                                      frames=1500, shots=123, drops=4, reconnects=1, memory_entries=10,
                                      memory_capacity=10, span_start_s=2.5, span_end_s=75.25, queue_depth=2,
                                      last_error="connection reset" if s.stream == "flaky" else None)
                       for s in self.streams.values() if r.stream in (None, s.stream)]
            if r.stream is not None and not streams:
                raise p.RequestError(p.ErrorCode.UNKNOWN_STREAM, f"no stream {r.stream!r}")
            return p.StatusResult(engine=p.EngineStatus(model="store", device="cpu", uptime_s=3725.0,
                                                        questions_answered=7, question_latency_p50_s=0.25,
                                                        question_latency_p99_s=1.5),
                                  streams=streams)
        if isinstance(r, p.SaveSnapshot):
            names = [self._stream(r.stream).stream] if r.stream else sorted(self.streams)
            return p.SaveSnapshotResult(saved=[p.SavedSnapshot(stream=n, path=f"/state/{n}.snap", size_bytes=2048,
                                                               time_s=time.time()) for n in names])
        raise AssertionError(f"unexpected request {r!r}")
