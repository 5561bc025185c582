"""Streaming frame by frame equals MA-LMM's whole-clip algorithm, written here independently.

The reference below follows MA-LMM's code path plainly: per frame, add the frame's position row,
cross-attend to cat(visual bank, frame), self-attend over cat(query bank, hidden) in every layer, then
store and compress each bank with `memory_bank_compress` when it holds more than M entries. Attention is
written out (softmax(QK^T / sqrt(d)) V) over the transformers Q-Former's own Linear layers.
"""

import math

import pytest
import torch

from mixmalmm.kernels import memory_bank_compress

from .conftest import make_model, random_pixels

QUESTION = "what is the man holding?"


def attention(attn_module, hidden, source):
    """Eager multi-head attention through a transformers InstructBlipQFormerAttention's weights."""
    a = attn_module.attention
    h, d = a.num_attention_heads, a.attention_head_size

    def split(x):
        return x.view(x.shape[0], x.shape[1], h, d).transpose(1, 2)

    q, k, v = split(a.query(hidden)), split(a.key(source)), split(a.value(source))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    context = (probs @ v).transpose(1, 2).reshape(hidden.shape)
    return attn_module.output(context, hidden)


def store(bank, sizes, x, capacity):
    """Append x [B, N, C] as a new entry; compress when over capacity (MA-LMM)."""
    x = x[:, None]
    ones = torch.ones(x.shape[:3], dtype=torch.int32)
    bank = x if bank is None else torch.cat([bank, x], dim=1)
    sizes = ones if sizes is None else torch.cat([sizes, ones], dim=1)
    if bank.shape[1] > capacity:
        bank, sizes = memory_bank_compress(bank, sizes)
    return bank, sizes


@torch.no_grad()
def reference_outputs(model, feats, input_ids, capacity, rows=None):
    """Yield the query outputs [1, Q, C] after each frame of feats [T, N, C_vis] (MA-LMM, one clip).

    rows: the position table row of each frame (default: frame t uses row t, as MA-LMM's 120 rows).
    """
    hf_layers = [layer for layer in model.qformer.encoder.layer]
    Q = model.num_queries
    visual = visual_sizes = None
    qbanks = [None] * len(hf_layers)
    qsizes = [None] * len(hf_layers)
    for t in range(feats.shape[0]):
        x = feats[t : t + 1] + model.frame_position.weight[t if rows is None else rows[t]]
        frames = x[:, None] if visual is None else torch.cat([visual, x[:, None]], dim=1)
        encoder = frames.reshape(1, -1, frames.shape[-1])
        hidden = model.qformer.embeddings(input_ids=input_ids, query_embeds=model.query_tokens)
        for i, layer in enumerate(hf_layers):
            past = qbanks[i]
            keys = hidden if past is None else torch.cat([past.reshape(1, -1, hidden.shape[-1]), hidden], dim=1)
            attended = attention(layer.attention, hidden, keys)
            qbanks[i], qsizes[i] = store(qbanks[i], qsizes[i], hidden, capacity)
            queries = attended[:, :Q]
            if layer.has_cross_attention:
                queries = attention(layer.crossattention, queries, encoder)
            out_q = layer.output_query(layer.intermediate_query(queries), queries)
            text = attended[:, Q:]
            hidden = torch.cat([out_q, layer.output(layer.intermediate(text), text)], dim=1)
        visual, visual_sizes = store(visual, visual_sizes, x, capacity)
        yield hidden[:, :Q]


@pytest.mark.parametrize("capacity", [1, 2, 5])
def test_streaming_equals_whole_clip(capacity):
    model = make_model(capacity, seed=capacity)
    T = 3 * capacity
    pixels = random_pixels(T, seed=capacity)
    feats = model.encode_frames(pixels)
    state = model.create_state("s")
    q = model.register_question(state, QUESTION)
    reference = reference_outputs(model, feats, q.input_ids, capacity)
    for t in range(T):
        model.step([state], feats[t : t + 1], [0.5 * t])
        expected = next(reference)
        torch.testing.assert_close(q.output, expected, rtol=1e-5, atol=1e-5, msg=f"frame {t}, M={capacity}")
        assert state.visual_bank.count == min(t + 1, capacity + 1)
    # The answer is the LLM on those query outputs.
    answer = model.answer(state, QUESTION, max_new_tokens=6)
    assert answer.mode == "standing"
    assert answer.token_ids == model.generate_tokens(expected, model.prompt(QUESTION), max_new_tokens=6)
    assert answer.time_span == (0.0, 0.5 * (T - 1))
    # The offline clip pass (batched clips, MA-LMM's own loop) agrees too.
    with torch.no_grad():
        clip = model.clip_query_output(pixels[None], [QUESTION])
    torch.testing.assert_close(clip, expected, rtol=1e-5, atol=1e-5)


def test_frames_past_the_position_table_clamp_by_default():
    model = make_model(2, max_num_frames=3)
    feats = model.encode_frames(random_pixels(6, seed=9))
    state = model.create_state()
    q = model.register_question(state, QUESTION)
    reference = reference_outputs(model, feats, q.input_ids, 2, rows=[0, 1, 2, 2, 2, 2])
    for t in range(6):
        model.step([state], feats[t : t + 1], [float(t)])
        torch.testing.assert_close(q.output, next(reference), rtol=1e-5, atol=1e-5)
    assert [model.frame_index(t) for t in (0, 2, 3, 500)] == [0, 2, 2, 2]
    cycling = make_model(2, max_num_frames=3, frame_position_policy="cycle")
    assert [cycling.frame_index(t) for t in (0, 2, 3, 500)] == [0, 2, 0, 500 % 3]


def test_batched_streams_equal_separate_streams():
    """Several states stepped in one call (different fills and questions) equal stepping each alone."""
    model = make_model(2, seed=4)
    feats = model.encode_frames(random_pixels(7, seed=4))
    together = [model.create_state("a"), model.create_state("b")]
    alone = [model.create_state("a"), model.create_state("b")]
    for states in (together, alone):
        model.register_question(states[0], QUESTION)
        model.register_question(states[1], "is there a dog?")
        model.register_question(states[1], QUESTION)
    # Stream b starts two frames late, so fills differ for a while.
    model.step([together[0]], feats[0:1], [0.0])
    model.step([alone[0]], feats[0:1], [0.0])
    model.step([together[0]], feats[1:2], [1.0])
    model.step([alone[0]], feats[1:2], [1.0])
    for t in range(2, 6):
        model.step(together, torch.cat([feats[t : t + 1], feats[t + 1 : t + 2]]), [float(t), float(t) + 0.5])
        model.step([alone[0]], feats[t : t + 1], [float(t)])
        model.step([alone[1]], feats[t + 1 : t + 2], [float(t) + 0.5])
    for a, b in zip(together, alone, strict=True):
        for qa, qb in zip(a.questions(), b.questions(), strict=True):
            torch.testing.assert_close(qa.output, qb.output, rtol=1e-5, atol=1e-5)
        assert a.time_span() == b.time_span()
