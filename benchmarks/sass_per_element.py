"""What the Triton AdamW kernel's instructions allow on a GPU, read without one: each AdamW row of
gpu_moment_modes.py compiled ahead of time for sm_90 (as tests/test_triton_ptx.py compiles it), its SASS
disassembled (cuobjdump, shipped with Triton), and the instructions a thread runs for one element on the path of a
whole block counted.

The count follows the code a thread runs for a whole block when no division or root takes its slow path
(whole_block_path): the prologue (the tensor's search and scalars, which every thread computes once a program, so
shared among the BLOCKS blocks a program steps), then one trip through the loop over those blocks; it is divided by
the elements a thread steps in a block (BLOCK / (32 x NUM_WARPS)). An SM issues one instruction a cycle for each of
its four warp schedulers, so a step of N elements takes at least N x count / (SMs x 128 x clock): the issue floor.
Beside it, the time the row's bytes take at the copy roof, and the highest % of that roof the floor leaves (100 when
the bytes take longer). Defaults: an H200 (132 SMs, 1.98 GHz, the 4,236 GB/s copy roof it measured), 64 M params;
--measured adds the Triton times of a gpu_moment_modes.py JSON.

    python benchmarks/sass_per_element.py [--measured benchmarks/results/nvidia-h200/moment_modes.json]
    python benchmarks/sass_per_element.py --blocks 1 --max-registers 0   # the launch before BLOCKS and the cap
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from cpu_moment_modes import OPTIMIZERS, label, step_bytes

NUMEL = 64 * 2**20
SIGNATURE = {  # _adam_kernel's runtime arguments, in order
    "table_ptr": "*i64", "lr_bits": "i64", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
    "log_beta1_bits": "i64", "log_beta2_bits": "i64", "one_minus_beta1": "fp32", "beta2": "fp32",
    "one_minus_beta2": "fp32", "eps": "fp32", "weight_decay": "fp32", "seed": "i32", "first_tensor_index": "i32",
    "num_tensors": "i32",
}
INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")  # /*address*/ text ;


def compile_adamw(dtype: str, moments: str, options: tuple):
    """(the Triton AdamW kernel of one row for sm_90: aligned, one tensor, AdamW's decoupled decay; the elements a
    thread steps in a block; the blocks a program steps)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_optim.triton import adam
    from fused_optim.triton._table import EXACT_ARITHMETIC

    master = dict(options).get("master_weights")
    write = adam.STOCHASTIC if dict(options).get("stochastic_rounding") else {
        None: adam.NEAREST, True: adam.REMAINDER, 24: adam.REMAINDER8}[master]
    param_dtype = {"float32": tl.float32, "bfloat16": tl.bfloat16}[dtype]
    constexprs = dict(PARAM_DTYPE=param_dtype, GRAD_DTYPE=param_dtype,
                      MOMENT_DTYPE={"fp32": tl.float32, "bf16": tl.bfloat16, "int8": tl.int8}[moments],
                      DECOUPLED=True, AMSGRAD=False, MAXIMIZE=False, WRITE=write.value, HAS_LR_TENSOR=False,
                      HAS_GRAD_SCALE=False, HAS_FOUND_INF=False, ALIGNED=True, SEARCH_STEPS=1,
                      COLUMNS=adam.COLUMNS, BLOCK=adam.BLOCK, BLOCKS=adam.BLOCKS)
    source = ASTSource(fn=adam._adam_kernel, signature={**SIGNATURE, **{k: "constexpr" for k in constexprs}},
                       constexprs=constexprs, attrs={(0,): [["tt.divisibility", 16]]})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={**EXACT_ARITHMETIC, "num_warps": adam.NUM_WARPS, "maxnreg": adam.MAX_REGISTERS})
    return kernel, adam.BLOCK // (32 * adam.NUM_WARPS), adam.BLOCKS


def disassemble(cubin: bytes) -> tuple[list[tuple[int, str]], int]:
    """(the SASS instructions in order as (address, text), the registers a thread takes)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([tool, "-sass", file.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", file.name], capture_output=True, text=True, check=True).stdout
    instructions = [(int(match.group(1), 16), match.group(2)) for line in sass.splitlines()
                    if (match := INSTRUCTION.match(line))]
    return instructions, int(re.search(r"REG:(\d+)", usage).group(1))


BRANCH = re.compile(r"^(@!?U?P\w+ )?BRA (?:!?U?P\w+, )?(0x[0-9a-f]+)$")
FAR = 64  # instructions: a branch past more than this chooses between paths, not around a special case


def wide_load_distance(texts: list[str], i: int) -> float:
    """Instructions from i, read straight on, to the next 16-byte load (inf if an EXIT or the end comes first)."""
    for j in range(i, len(texts)):
        if texts[j].startswith("LDG.E.128"):
            return j - i
        if texts[j] == "EXIT":
            break
    return float("inf")


def whole_block_path(instructions: list[tuple[int, str]]) -> tuple[int, int]:
    """(instructions before the loop over a program's blocks, instructions of one trip through it), on the path a
    whole block takes when no division or root takes its slow path. Walks the code from its start: a branch whose
    fall-through calls a slow path within a few instructions is taken (and one whose target does is not); a branch
    past more than FAR instructions goes the way that reaches a 16-byte load sooner (the whole block's path rather
    than the partial block's, or than skipping the block); any other branch, and a predicated EXIT, falls through.
    The trip ends at the jump back to the loop's start."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    texts = [text for _, text in instructions]
    back_jumps = [(i, index[int(match.group(2), 16)]) for i, text in enumerate(texts)
                  if (match := BRANCH.match(text)) and match.group(1) is None and index[int(match.group(2), 16)] < i]
    # the loop's start (the code ends in a jump to itself, past the last EXIT: not it); with one block a program
    # there is no loop, and the walk ends at the EXIT
    header = back_jumps[0][1] if back_jumps else None
    i, count, prologue = 0, 0, 0
    for _ in range(100 * len(texts)):
        text = texts[i]
        if i == header and not prologue:
            prologue = count
        count += 1
        if text == "EXIT" and header is None:
            return 0, count
        branch = BRANCH.match(text)
        if branch is None:
            i += 1
            continue
        target = index[int(branch.group(2), 16)]
        if branch.group(1) is None:  # unconditional
            if target < i:  # the loop's jump back: one trip done
                return prologue, count - prologue
            i = target
            continue
        if any(t.startswith("CALL") for t in texts[i + 1:i + 6]):
            taken = True
        elif any(t.startswith("CALL") for t in texts[target:target + 5]):
            taken = False
        elif abs(target - i) > FAR:
            taken = wide_load_distance(texts, target) < wide_load_distance(texts, i + 1)
        else:
            taken = False
        if taken and target <= i:
            raise ValueError(f"a conditional jump back at {instructions[i][0]:#x}: not a loop this walk knows")
        i = target if taken else i + 1
    raise ValueError("the walk did not come back to the loop's start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--clock-ghz", type=float, default=1.98)
    parser.add_argument("--roof-gbps", type=float, default=4236.0)
    parser.add_argument("--measured", help="a gpu_moment_modes.py JSON: its Triton times beside the floor")
    parser.add_argument("--blocks", type=int, help="blocks a program (default: the launcher's BLOCKS)")
    parser.add_argument("--max-registers", type=int, help="registers a thread at most, 0 for no cap (default: the "
                                                            "launcher's MAX_REGISTERS)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("sass_per_element.py compiles for a GPU: run it without TRITON_INTERPRET=1.")
    from fused_optim.triton import adam

    if args.blocks is not None:
        adam.BLOCKS = args.blocks
    if args.max_registers is not None:
        adam.MAX_REGISTERS = args.max_registers or None
    measured = {}
    if args.measured:
        with open(args.measured) as file:
            measured = {row["row"]: row["ms"] for row in json.load(file)["rows"]
                        if row.get("backend") == "triton" and "ms" in row}

    issue_rate = args.sms * 4 * 32 * args.clock_ghz * 1e9  # thread instructions a second
    print(f"{'row':64s} regs  SASS/elem  issue floor  bytes at roof  ceiling  measured (Triton)")
    for row in [row for row in OPTIMIZERS if row[0] == "AdamW"]:
        kernel, per_thread, blocks = compile_adamw(*row[1:])
        instructions, registers = disassemble(kernel.asm["cubin"])
        prologue, trip = whole_block_path(instructions)
        per_element = (prologue / blocks + trip) / per_thread
        floor_ms = NUMEL * per_element / issue_rate * 1e3
        bytes_ms = step_bytes(*row, NUMEL) / (args.roof_gbps * 1e9) * 1e3
        ceiling = min(100.0, 100 * bytes_ms / floor_ms)
        ms = measured.get(label(*row))
        print(f"{label(*row):64s} {registers:4d} {per_element:10.1f} {floor_ms:9.3f} ms {bytes_ms:10.3f} ms "
              f"{ceiling:6.0f} %  " + (f"{ms:.3f} ms (floor + bytes {floor_ms + bytes_ms:.3f})" if ms else ""))


if __name__ == "__main__":
    main()
