"""Compiles every Triton kernel specialisation to PTX for an sm_90 GPU; prints one line per kernel.

Run as a script by test_triton_compile.py with TRITON_INTERPRET=0: under the interpreter (which the
test session turns on without CUDA) kernels are Python functions and never meet the compiler.
"""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mixmalmm.kernels import triton_bank

H100 = GPUTarget("cuda", 90, 32)


def update_signature(dtype: str) -> dict[str, str]:
    sig = {name: "*i64" for name in ("seq_ptr", "prev_ptr", "next_ptr", "tail_ptr", "free_ptr")}
    sig.update(data_ptr=f"*{dtype}", x_ptr=f"*{dtype}", side_ptr=f"*{dtype}", xs_ptr=f"*{dtype}", sizes_ptr="*i32",
               tfirst_ptr="*fp64", tlast_ptr="*fp64", sim_ptr="*fp32", time_ptr="*fp64", S="i32", N="i32",
               C="i32", D="i32", count="i32", new_seq="i64", eps="fp32")
    for name in ("DO_MERGE", "DO_APPEND", "HAS_SIDE", "BLOCK_N", "BLOCK_S", "BLOCK_C", "BLOCK_D"):
        sig[name] = "constexpr"
    names = triton_bank._bank_update_kernel.arg_names
    assert set(sig) == set(names), f"the kernel's parameters changed: {names}"
    return {name: sig[name] for name in names}


def main() -> None:
    for dtype, merge, append, side in [("fp32", True, True, False), ("fp32", False, True, False),
                                       ("fp32", True, False, False), ("bf16", True, True, False),
                                       ("fp16", True, True, False), ("fp32", True, True, True),
                                       ("fp32", True, False, True), ("bf16", True, True, True),
                                       ("fp16", False, True, True)]:
        src = ASTSource(fn=triton_bank._bank_update_kernel, signature=update_signature(dtype),
                        constexprs={"DO_MERGE": merge, "DO_APPEND": append, "HAS_SIDE": side, "BLOCK_N": 4,
                                    "BLOCK_S": 16, "BLOCK_C": 256, "BLOCK_D": 256})
        ptx = triton.compile(src, target=H100).asm["ptx"]
        assert ".entry _bank_update_kernel" in ptx
        print(f"ok _bank_update_kernel {dtype} merge={merge} append={append} side={side}")
    for dtype in ("fp32", "bf16"):
        sig = {"bank_ptr": f"*{dtype}", "out_ptr": "*fp32", "rows": "i32", "T": "i32", "N": "i32", "C": "i32",
               "eps": "fp32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
        assert list(sig) == triton_bank._adjacent_similarity_kernel.arg_names
        src = ASTSource(fn=triton_bank._adjacent_similarity_kernel, signature=sig,
                        constexprs={"BLOCK_R": 16, "BLOCK_C": 256})
        assert ".entry _adjacent_similarity_kernel" in triton.compile(src, target=H100).asm["ptx"]
        print(f"ok _adjacent_similarity_kernel {dtype}")


if __name__ == "__main__":
    main()
