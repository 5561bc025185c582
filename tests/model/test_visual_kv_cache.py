"""The visual bank's cached cross-attention keys/values (StreamConfig.visual_kv_cache) against the
recompute path, which projects the whole bank at every step (MA-LMM's own computation)."""

import pytest
import torch

from .conftest import make_model, random_pixels

QUESTION = "what is the man holding?"


def pair(M, seed, **config):
    """The same weights twice: with the keys/values cache (the default) and without."""
    return make_model(M, seed=seed, **config), make_model(M, seed=seed, visual_kv_cache=False, **config)


def key_rows(model):
    """Visual tokens each cross-attention key projection is given, call by call (a real forward hook)."""
    rows = []
    for i in model.qformer.cross_attention_layers:
        key = model.qformer.encoder.layer[i].crossattention.attention.key
        key.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[-2]))
    return rows


@pytest.mark.parametrize("present_frame", [False, True])
def test_a_cached_step_projects_its_new_frame_only(present_frame):
    M = 4
    cached, plain = pair(M, seed=3, present_frame=present_frame)
    feats = cached.encode_frames(random_pixels(2 * M + 3, seed=3))
    N = cached.vision_tokens
    seen = {}
    for name, model in (("cached", cached), ("plain", plain)):
        state = model.create_state()
        model.register_question(state, QUESTION)
        for t in range(M + 1):
            model.step([state], feats[t : t + 1], [float(t)])
        rows = key_rows(model)
        for t in range(M + 1, feats.shape[0]):  # steady state: M stored entries plus the new one
            model.step([state], feats[t : t + 1], [float(t)])
        model.answer(state, "is there a dog?", max_new_tokens=2)  # ad hoc: reads the bank again
        seen[name] = rows
    layers = len(cached.qformer.cross_attention_layers)
    steps = feats.shape[0] - (M + 1)
    # One projection of the new frame per step (and of the marked present frame); none to answer.
    assert seen["cached"] == [N] * layers * steps * (2 if present_frame else 1) + [N] * layers * present_frame
    # The recompute path projects all M+1 entries (and the present frame) at every Q-Former pass.
    assert set(seen["plain"]) == {(M + 1 + present_frame) * N} and len(seen["plain"]) >= layers * (steps + 1)


@pytest.mark.parametrize(("M", "present_frame"), [(1, False), (4, False), (3, True)])
def test_cached_keys_values_match_the_recompute_path_frame_by_frame(M, present_frame):
    cached, plain = pair(M, seed=M, present_frame=present_frame)
    feats = cached.encode_frames(random_pixels(4 * M + 6, seed=M))
    T = feats.shape[0]
    runs = {}
    for name, model in (("cached", cached), ("plain", plain)):
        # Two streams stepped together (stream b two frames behind: other fills) with standing questions.
        a, b = model.create_state("a"), model.create_state("b")
        model.register_question(a, QUESTION)
        model.register_question(b, "is there a dog?")
        outputs = []
        for t in range(T):
            if t < 2:
                model.step([a], feats[t : t + 1], [float(t)])
            else:
                model.step([a, b], torch.cat([feats[t : t + 1], feats[t - 2 : t - 1]]), [float(t), t - 2.0])
            outputs.append([q.output.clone() for s in (a, b) for q in s.questions() if q.output is not None])
        runs[name] = (a, b, outputs)
    for t, (got, want) in enumerate(zip(runs["cached"][2], runs["plain"][2], strict=True)):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"frame {t}, M={M}")
    for s_cached, s_plain in zip(runs["cached"][:2], runs["plain"][:2], strict=True):
        bank = s_cached.visual_bank
        assert int(bank.ordered()[1].max()) > 1  # merges happened
        # The cache stays the projection of the (merged) entries, which are the recompute path's own.
        for x, y in zip(bank.ordered(), s_plain.visual_bank.ordered(), strict=True):
            assert torch.equal(x, y)
        entries, _ = bank.ordered()
        torch.testing.assert_close(bank.ordered_side(), cached.qformer.project_visual(entries), rtol=1e-5, atol=1e-5)
        for question, adhoc in ((QUESTION, True), ("what colour is the car?", False), (None, False)):
            got, mode = cached.query_output(s_cached, question, adhoc=adhoc)
            want, want_mode = plain.query_output(s_plain, question, adhoc=adhoc)
            assert mode == want_mode
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert cached.answer(s_cached, question, max_new_tokens=4, adhoc=adhoc) == plain.answer(
                s_plain, question, max_new_tokens=4, adhoc=adhoc
            )


def test_training_keeps_the_recompute_path_and_agrees_with_the_cached_stream():
    """The clip pass projects with gradients (no cache); its output is the cached stream's."""
    M = 2
    model = make_model(M, seed=21)
    pixels = random_pixels(3 * M + 1, seed=21)
    model.train()
    loss = model.clip_loss(pixels[None], [QUESTION], ["a cup"])
    loss.backward()
    for i in model.qformer.cross_attention_layers:
        grad = model.qformer.encoder.layer[i].crossattention.attention.key.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        clip = model.clip_query_output(pixels[None], [QUESTION])
    state = model.create_state()
    q = model.register_question(state, QUESTION)
    feats = model.encode_frames(pixels)
    for t in range(pixels.shape[0]):
        model.step([state], feats[t : t + 1], [float(t)])
    assert state.visual_bank.side is not None
    torch.testing.assert_close(q.output, clip, rtol=1e-5, atol=1e-5)
