"""Banks never hold more than M+1 entries and a stream's memory stays flat however long it runs."""

import torch

from .conftest import make_model


def test_banks_bounded_over_thousands_of_frames():
    M = 3
    model = make_model(M, seed=5)
    state = model.create_state("long")
    model.register_question(state, "is there a dog?")
    N, C = model.vision_tokens, model.blip_config.vision_config.hidden_size
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(64, N, C, generator=gen)
    model.step([state], feats[:1], [0.0])
    start_bytes = state.nbytes()
    frames = 2000  # far past the 120-row position table
    for t in range(1, frames):
        model.step([state], feats[t % 64 : t % 64 + 1], [t / 25.0])
        if t % 97 == 0 or t == frames - 1:
            for bank in state.banks():
                assert bank.count <= M + 1
            assert state.nbytes() == start_bytes
    assert all(bank.count == M + 1 for bank in state.banks())
    # Every frame is still accounted for: merge counts sum to the frames seen, per token column.
    _, sizes = state.visual_bank.ordered()
    assert torch.all(sizes.sum(dim=1) == frames)
    for q in state.questions():
        assert q.steps == frames
        _, qsizes = q.banks[-1].ordered()
        assert torch.all(qsizes.sum(dim=1) == frames)
    assert state.frames == frames
    assert state.time_span() == (0.0, (frames - 1) / 25.0)
    answer = model.answer(state, "is there a dog?", max_new_tokens=3)
    assert answer.frames == frames and answer.time_span == state.time_span()
