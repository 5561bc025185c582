"""Per-frame cost of the streaming memory bank against MA-LMM's recompute-and-concatenate.

For each bank shape (the visual bank: N=257 tokens of C=1408; a query bank: N=32+16 of C=768) and
capacity M, the bank is filled to steady state, then every frame costs:
- malmm:     torch.cat the new frame onto the bank, then memory_bank_compress (all T-1 similarities,
             a gather of the whole bank) - what MA-LMM does;
- streaming: StreamingMemoryBank.append (one merge + one store, O(N*C)), torch path;
- triton:    the same with the fused Triton kernel (CUDA only).
On CUDA it also reports the streaming kernel's achieved bandwidth against a plain device copy.

    python benchmarks/memory_bank.py            # full table
    python benchmarks/memory_bank.py --quick    # fewer frames, capacities 10 and 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mixmalmm.kernels import StreamingMemoryBank, memory_bank_compress

SHAPES = {"visual 257x1408": (257, 1408), "query 48x768": (48, 768)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(step, frames: int, device: torch.device, warmup: int = 3) -> float:
    # Untimed frames first: the allocator and the thread pool settle (the first large temporaries
    # otherwise pay page faults on every frame).
    for _ in range(warmup):
        step()
    times = []
    for _ in range(frames):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_malmm(M, N, C, dtype, device, frames) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    state = {
        "bank": torch.randn(1, M, N, C, generator=g, device=device).to(dtype),
        "sizes": torch.ones(1, M, N, dtype=torch.int32, device=device),
    }
    x = torch.randn(1, 1, N, C, generator=g, device=device).to(dtype)
    one = torch.ones(1, 1, N, dtype=torch.int32, device=device)

    def step():
        bank = torch.cat([state["bank"], x], dim=1)
        sizes = torch.cat([state["sizes"], one], dim=1)
        state["bank"], state["sizes"] = memory_bank_compress(bank, sizes, backend="torch")

    return _median_ms(step, frames, device)


def _filled_bank(M, N, C, dtype, device, backend) -> tuple[StreamingMemoryBank, torch.Tensor]:
    bank = StreamingMemoryBank(M, 1, N, C, dtype=dtype, device=device, backend=backend)
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(M + 1):
        bank.append(torch.randn(1, N, C, generator=g, device=device).to(dtype))
    return bank, torch.randn(1, N, C, generator=g, device=device).to(dtype)


def time_streaming(M, N, C, dtype, device, frames, backend) -> float:
    bank, x = _filled_bank(M, N, C, dtype, device, backend)
    return _median_ms(lambda: bank.append(x), frames, device)


def copy_bandwidth_gbs(device: torch.device) -> float:
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 20, device)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def streaming_bytes(M, N, C, elem) -> int:
    """Bytes one fused update moves: 5 entries read (pair, neighbours, tail), 2 written, the new
    entry read, plus the per-column similarity and sequence rows scanned for the argmax."""
    return (8 * N * C * elem) + (M + 1) * N * (4 + 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="capacities 10 and 100, fewer frames")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    ap.add_argument("--frames", type=int, default=None, help="timed frames per cell")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    capacities = [10, 100] if args.quick else [10, 100, 1000]
    frames = args.frames or (5 if args.quick else 20)
    torch.set_grad_enabled(False)

    print(f"memory bank per-frame update, {device.type} ({torch.get_num_threads()} threads), {dtype}, "
          f"median of {frames} frames at steady state")
    header = ["bank", "M", "malmm ms", "streaming torch ms", "malmm/torch"]
    cuda = device.type == "cuda"
    if cuda:
        header += ["triton ms", "malmm/triton", "triton GB/s", "% of copy"]
        copy_bw = copy_bandwidth_gbs(device)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (N, C) in SHAPES.items():
        for M in capacities:
            base = time_malmm(M, N, C, dtype, device, frames)
            ours = time_streaming(M, N, C, dtype, device, frames, "torch")
            row = [name, str(M), f"{base:.3f}", f"{ours:.3f}", f"{base / ours:.1f}x"]
            if cuda:
                fast = time_streaming(M, N, C, dtype, device, frames, "triton")
                gbs = streaming_bytes(M, N, C, torch.finfo(dtype).bits // 8) / (fast * 1e-3) / 1e9
                row += [f"{fast:.3f}", f"{base / fast:.1f}x", f"{gbs:.0f}", f"{100 * gbs / copy_bw:.0f}%"]
            print("| " + " | ".join(row) + " |", flush=True)
    if cuda:
        print(f"device copy bandwidth: {copy_bw:.0f} GB/s")


if __name__ == "__main__":
    main()
