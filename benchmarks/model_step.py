"""Time per frame of streaming MA-LMM: vision encoder, Q-Former step with memory, answer generation.

    python benchmarks/model_step.py                              # tiny config, CPU, float32
    python benchmarks/model_step.py --device cuda --full         # InstructBLIP-Vicuna-7B dims, random fp16
    python benchmarks/model_step.py --full --depth 1 --frames 3  # full widths, 1 layer per stack: shape dry run
    python benchmarks/model_step.py --full --depth 2 --frames 3 --standing 0 --streams 2  # the same on a small CPU

Weights are random (nothing is downloaded): speeds and memory are those of the real shapes, answers are
noise. Prints a markdown table: per-frame milliseconds and frames per second, how the Q-Former step grows
with memory_bank_length (10, 20, 100) with the visual bank's keys/values cached (the default) and
recomputed at every step (`StreamConfig(visual_kv_cache=False)`), several streams stepped in one call,
answer latency (greedy and beam search), state bytes per stream, visual bank bytes per entry and peak
GPU memory, and how far ad-hoc query outputs fall from standing ones (cosine similarity; meaningful only
with trained weights).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
)

from mixmalmm.model import MALMM, StreamConfig  # noqa: E402
from mixmalmm.model.tiny import tiny_instructblip, tiny_processor  # noqa: E402

QUESTION = "what is the man holding?"


def full_model(device: torch.device, dtype: torch.dtype, depth: int | None, memory_bank_length: int) -> MALMM:
    """InstructBLIP-Vicuna-7B shapes (EVA ViT-g/14 224 px, BERT-base Q-Former, Llama 7B), random weights.

    depth caps every stack's layer count (a dry run of the shapes on a small machine).
    """
    processor = tiny_processor(image_size=224, num_query_tokens=32)  # in-code tokenizers fit the vocabularies
    vision = InstructBlipVisionConfig(
        hidden_size=1408, intermediate_size=6144, num_hidden_layers=depth or 39, num_attention_heads=16,
        image_size=224, patch_size=14, qkv_bias=True,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=30523, hidden_size=768, num_hidden_layers=depth or 12, num_attention_heads=12,
        intermediate_size=3072, encoder_hidden_size=1408, cross_attention_frequency=2,
    )
    llm_tok = processor.tokenizer
    text = LlamaConfig(
        vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=depth or 32,
        num_attention_heads=32, max_position_embeddings=2048, bos_token_id=llm_tok.bos_token_id,
        eos_token_id=llm_tok.eos_token_id, pad_token_id=llm_tok.pad_token_id, tie_word_embeddings=False,
    )
    config = InstructBlipConfig(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=32, image_token_index=llm_tok.convert_tokens_to_ids("<image>"),
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            blip = InstructBlipForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = MALMM(blip, processor, StreamConfig(memory_bank_length=memory_bank_length))
    return model.to(device=device, dtype=dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def with_bank_length(model: MALMM, M: int, visual_kv_cache: bool = True) -> MALMM:
    """The same weights with another memory_bank_length and cache setting (states are made per setting)."""
    model.config.memory_bank_length = M
    model.config.visual_kv_cache = visual_kv_cache
    return model


def kv_name(visual_kv_cache: bool) -> str:
    return "keys/values cached" if visual_kv_cache else "keys/values recomputed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="InstructBLIP-Vicuna-7B dimensions (random weights)")
    ap.add_argument("--depth", type=int, default=None, help="cap layers per stack (with --full: a dry run)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    ap.add_argument("--frames", type=int, default=20, help="timed repeats per measurement")
    ap.add_argument("--streams", type=int, default=8, help="streams stepped together in the batched row")
    ap.add_argument("--lengths", default="10,20,100", help="memory_bank_length values")
    ap.add_argument("--standing", default="0,2", help="standing questions beside the default one, per step row")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    lengths = [int(x) for x in args.lengths.split(",")]
    standings = [int(x) for x in args.standing.split(",")]
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    if args.full:
        model = full_model(device, dtype, args.depth, lengths[0])
        name = "InstructBLIP-Vicuna-7B dims" + (f", depth {args.depth}" if args.depth else "")
    else:
        blip, processor = tiny_instructblip(seed=0)
        model = MALMM(blip, processor, StreamConfig(memory_bank_length=lengths[0])).to(device=device, dtype=dtype)
        model.eval()
        name = "tiny"
    build_s = time.perf_counter() - t0
    size = model.image_size
    gen = torch.Generator().manual_seed(0)
    rows: list[tuple[str, str, str]] = []

    def row(what: str, seconds: float, per: int = 1) -> None:
        ms = 1000 * seconds / per
        rows.append((what, f"{ms:.2f}", f"{1000 / ms:.1f}" if ms > 0 else "-"))

    # Vision encoder, batched across streams.
    for batch in sorted({1, args.streams}):
        pixels = torch.randn(batch, 3, size, size, generator=gen).to(device=device, dtype=dtype)
        row(f"vision encoder, batch {batch} (per frame)", timed(lambda p=pixels: model.encode_frames(p), device, args.frames), batch)
    feats = model.encode_frames(torch.randn(1, 3, size, size, generator=gen).to(device=device, dtype=dtype))

    # Q-Former step with memory, per memory_bank_length, after the banks are full; with the visual
    # bank's keys/values cached and recomputed at every step.
    state_bytes = {}
    entry_bytes = {}
    for M in lengths:
        for cache in (False, True):
            with_bank_length(model, M, cache)
            for standing in standings:
                state = model.create_state("bench")
                for i in range(standing):
                    model.register_question(state, f"{QUESTION} {i}")
                for t in range(M + 1):
                    model.step([state], feats, [float(t)])
                clock = [float(M + 1)]

                def step(state=state, clock=clock):
                    model.step([state], feats, [clock[0]])
                    clock[0] += 1.0

                row(f"Q-Former step, M={M}, default + {standing} standing, {kv_name(cache)}",
                    timed(step, device, args.frames))
                state_bytes[(M, standing, cache)] = state.nbytes()
            entry_bytes[cache] = state.visual_bank.nbytes() // state.visual_bank.slots

    # Several streams stepped in one call (Q-Former batched where fills match) vs one call each.
    M = lengths[0]
    with_bank_length(model, M)
    states = [model.create_state(f"s{i}") for i in range(args.streams)]
    many = feats.expand(args.streams, -1, -1).contiguous()
    for t in range(M + 1):
        model.step(states, many, [float(t)] * args.streams)
    row(f"Q-Former step, M={M}, {args.streams} streams in one call (per stream)",
        timed(lambda: model.step(states, many, [0.0] * args.streams), device, args.frames), args.streams)
    row(f"Q-Former step, M={M}, {args.streams} streams one by one (per stream)",
        timed(lambda: [model.step([s], feats, [0.0]) for s in states], device, args.frames), args.streams)

    # Answers.
    state = model.create_state("answers")
    model.register_question(state, QUESTION)
    for t in range(M + 1):
        model.step([state], feats, [float(t)])
    repeats = max(3, args.frames // 4)
    n = args.max_new_tokens

    def answer(**kw):
        return model.answer(state, QUESTION, max_new_tokens=n, **kw)

    row(f"answer, standing, greedy, {n} new tokens", timed(answer, device, repeats))
    row(f"answer, ad hoc, greedy, {n} new tokens", timed(lambda: answer(adhoc=True), device, repeats))
    row(f"answer, standing, beam 5, {n} new tokens", timed(lambda: answer(num_beams=5), device, repeats))
    standing_out, _ = model.query_output(state, QUESTION)
    adhoc_out, _ = model.query_output(state, QUESTION, adhoc=True)
    cosine = torch.nn.functional.cosine_similarity(standing_out.float(), adhoc_out.float(), dim=-1).mean().item()

    print(f"\n## model_step: {name}, {device.type}, {str(dtype).removeprefix('torch.')}\n")
    print(f"built in {build_s:.1f} s; {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"{model.vision_tokens} tokens per frame\n")
    print("| what | ms | per second |")
    print("|---|---:|---:|")
    for what, ms, fps in rows:
        print(f"| {what} | {ms} | {fps} |")
    print("\n| memory_bank_length | standing questions | visual keys/values | state bytes per stream |")
    print("|---:|---:|---|---:|")
    for (M, standing, cache), nbytes in state_bytes.items():
        print(f"| {M} | {standing} | {'cached' if cache else 'recomputed'} | {nbytes / 2**20:.2f} MiB |")
    plain = entry_bytes[False]
    print(f"\nvisual bank bytes per entry ({model.vision_tokens} tokens, merge counts and links included): "
          f"{plain / 2**10:.1f} KiB without the keys/values, {entry_bytes[True] / 2**10:.1f} KiB with them "
          f"({entry_bytes[True] / plain:.1f}x; {len(model.qformer.cross_attention_layers)} cross-attention layers)")
    print(f"\nad hoc vs standing query outputs (random weights): mean cosine {cosine:.3f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
