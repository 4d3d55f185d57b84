"""What the AdamW kernels' instructions allow on a GPU, read without one: for each AdamW row of gpu_moment_modes.py,
the Triton kernel compiled ahead of time for sm_90 (as tests/test_triton_ptx.py compiles it) and the CUDA C++ kernel
of the built extension (fused_optim/_C_cuda*.so, sm_90), their SASS disassembled (cuobjdump, shipped with Triton),
and the instructions a thread runs for one element of a whole block counted.

The count follows the code a thread runs for a whole block when no division or root takes its slow path
(whole_block_path): the prologue (the tensor's search and scalars, once a program: Triton's BLOCKS blocks, CUDA's
four iterations of 8 elements a thread), then one trip through the loop over the blocks, divided by the elements a
thread steps in one (Triton: BLOCK / (32 x NUM_WARPS)). An SM issues one instruction a cycle for each of
its four warp schedulers, so a step of N elements takes at least N x count / (SMs x 128 x clock): the issue floor.
Beside it, the time the row's bytes take at the copy roof, and the highest % of that roof the floor leaves (100 when
the bytes take longer). Then what hides the memory's latency: the warps an SM holds at once (its 64 K registers
over the kernel's registers, at most 64; the more warps, the more loads in flight while others compute), and the
barriers a thread waits at an element (BAR.SYNC: Triton puts one wherever it passes a tensor through shared memory
to give it another layout, e.g. an fp32 store beside 16-bit arrays; every warp of the program then waits for the
slowest). Defaults: an H200 (132 SMs, 1.98 GHz, the 4,236 GB/s copy roof it measured), 64 M params; --measured
adds the times of a gpu_moment_modes.py JSON.

    python benchmarks/sass_per_element.py [--measured benchmarks/results/nvidia-h200/moment_modes.json]
    python benchmarks/sass_per_element.py --blocks 4   # four blocks a Triton program
    python benchmarks/sass_per_element.py --num-warps 8 --blocks 4
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

from cpu_moment_modes import OPTIMIZERS, label, step_bytes

NUMEL = 64 * 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNATURE = {  # _adam_kernel's runtime arguments, in order
    "table_ptr": "*i64", "lr_bits": "i64", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
    "log_beta1_bits": "i64", "log_beta2_bits": "i64", "one_minus_beta1": "fp32", "beta2": "fp32",
    "one_minus_beta2": "fp32", "eps": "fp32", "weight_decay_bits": "i64", "seed": "i32", "first_tensor_index": "i32",
    "num_tensors": "i32",
}
INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")  # /*address*/ text ;


def write_back(options: tuple) -> int:
    """How a row's update reaches its param: rounding.h's WriteBack, which triton/adam.py's constants number alike."""
    from fused_optim.triton import adam

    options = dict(options)
    if options.get("stochastic_rounding"):
        return adam.STOCHASTIC.value
    return {None: adam.NEAREST, True: adam.REMAINDER, 24: adam.REMAINDER8}[options.get("master_weights")].value


def cuobjdump(*args: str, check: bool = True) -> str:
    """What Triton's cuobjdump prints for these arguments (check: raise if it fails)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=check).stdout


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """cuobjdump's SASS as (address, text) in order."""
    return [(int(match.group(1), 16), match.group(2)) for line in sass.splitlines()
            if (match := INSTRUCTION.match(line))]


def compile_adamw(dtype: str, moments: str, options: tuple):
    """(the Triton AdamW kernel of one row for sm_90: aligned, one tensor, AdamW's decoupled decay; the elements a
    thread steps in a block; the blocks a program steps)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_optim.triton import adam
    from fused_optim.triton._table import EXACT_ARITHMETIC

    param_dtype = {"float32": tl.float32, "bfloat16": tl.bfloat16}[dtype]
    constexprs = dict(PARAM_DTYPE=param_dtype, GRAD_DTYPE=param_dtype,
                      MOMENT_DTYPE={"fp32": tl.float32, "bf16": tl.bfloat16, "int8": tl.int8}[moments],
                      DECOUPLED=True, AMSGRAD=False, MAXIMIZE=False, WRITE=write_back(options), HAS_LR_TENSOR=False,
                      HAS_GRAD_SCALE=False, HAS_FOUND_INF=False, ALIGNED=True, SEARCH_STEPS=1,
                      COLUMNS=adam.COLUMNS, BLOCK=adam.BLOCK, BLOCKS=adam.BLOCKS)
    source = ASTSource(fn=adam._adam_kernel, signature={**SIGNATURE, **{k: "constexpr" for k in constexprs}},
                       constexprs=constexprs, attrs={(0,): [["tt.divisibility", 16]]})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={**EXACT_ARITHMETIC, "num_warps": adam.NUM_WARPS, "maxnreg": adam.MAX_REGISTERS})
    return kernel, adam.BLOCK // (32 * adam.NUM_WARPS), adam.BLOCKS, adam.NUM_WARPS


def disassemble(cubin: bytes) -> tuple[list[tuple[int, str]], int]:
    """(the SASS instructions in order as (address, text), the registers a thread takes)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass, usage = cuobjdump("-sass", file.name), cuobjdump("-res-usage", file.name)
    return sass_instructions(sass), int(re.search(r"REG:(\d+)", usage).group(1))


# csrc/cuda/adam.cu and adam_int8.cu: a block of 512 threads steps a chunk of 16 K elements, 8 a thread an iteration
CUDA_ELEMENTS_PER_THREAD, CUDA_ITERATIONS, CUDA_WARPS = 8, 4, 16
CUDA_TYPES = {"float32": "float", "bfloat16": "c10::BFloat16"}


def cuda_kernel_name(dtype: str, moments: str, options: tuple) -> str:
    """The demangled name's start of the CUDA C++ kernel one row launches (AdamW, no amsgrad)."""
    write = write_back(options)
    param = CUDA_TYPES[dtype]
    if moments == "int8":
        return f"adam_int8_kernel<{param}, {param}, false, (fused_optim::WriteBack){write}>"
    moment = {"fp32": "float", "bf16": "c10::BFloat16"}[moments]
    return f"adam_kernel<{param}, {param}, {moment}, false, (fused_optim::WriteBack){write}>"


def cuda_functions(library: str) -> dict[str, tuple[list[tuple[int, str]], int]]:
    """Every sm_90 kernel of the built CUDA extension: demangled name -> (its SASS instructions, its registers);
    none when it holds no sm_90 code."""
    sass = cuobjdump("-arch", "sm_90", "-sass", library, check=False)  # nothing when it holds no sm_90 code
    usage = cuobjdump("-arch", "sm_90", "-res-usage", library, check=False)
    names = re.findall(r"Function : (\S+)", sass)
    demangled = dict(zip(names, subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                                               check=True).stdout.splitlines()))
    registers = dict(re.findall(r"Function (\S+):\s*REG:(\d+)", usage))
    functions = {}
    for name, body in zip(names, re.split(r"\n\s*Function : \S+", sass)[1:]):
        functions[demangled[name]] = (sass_instructions(body), int(registers.get(name, 0)))
    return functions


BRANCH = re.compile(r"^(@!?U?P\w+ )?BRA (?:!?U?P\w+, )?(0x[0-9a-f]+)$")
MEMORY = re.compile(r"^(?:LDG|STG)\S*")


def memory_widths(texts: list[str]) -> tuple[bool, bool]:
    """(whether these instructions hold a global load or store of 8 or 16 bytes, whether one of fewer)."""
    accesses = [match.group(0) for text in texts if (match := MEMORY.match(text))]
    wide = [access.endswith((".64", ".128")) for access in accesses]
    return any(wide), not all(wide)


def whole_block_path(instructions: list[tuple[int, str]]) -> tuple[list[str], list[str]]:
    """(the instructions before the loop over a program's blocks, those of one trip through it), on the path a
    whole block takes when no division or root takes its slow path. The loop is the one around the block's 16-byte
    loads (8-byte ones where there are none; no loop: the walk ends at the EXIT, all of it one trip). Walks the code
    from its start: a branch whose fall-through calls a slow path within a few instructions is taken (and one whose
    target does is not); a branch past global accesses narrower than 8 bytes and none wider is taken (it chooses the
    aligned, whole block's path over the partial or misaligned one, and skips thread 0's scalars); any other branch,
    a jump back of another loop (a search: one trip counted) and a predicated EXIT fall through. The trip ends at
    the loop's jump back."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    texts = [text for _, text in instructions]
    # the block's loads: 16 bytes wide, or 8 (4 bf16 a thread); the table's addresses are 8-byte loads too
    wide_loads = ([i for i, text in enumerate(texts) if text.startswith("LDG.E.128")]
                  or [i for i, text in enumerate(texts) if text.startswith("LDG.E.64")])
    back_jumps = [(i, index[int(match.group(2), 16)]) for i, text in enumerate(texts) if (match := BRANCH.match(text))
                  and index[int(match.group(2), 16)] < i]
    back, header = next(((i, target) for i, target in back_jumps if any(target <= load < i for load in wide_loads)),
                        (None, None))
    i, path, prologue = 0, [], None
    for _ in range(100 * len(texts)):
        text = texts[i]
        if i == header and prologue is None:
            prologue = len(path)
        path.append(text)
        if i == back:
            return path[:prologue], path[prologue:]
        if text == "EXIT" and header is None:
            return [], path
        branch = BRANCH.match(text)
        if branch is None:
            i += 1
            continue
        target = index[int(branch.group(2), 16)]
        if branch.group(1) is None:  # unconditional
            i = target
            continue
        if target < i:
            taken = False
        elif any(t.startswith("CALL") for t in texts[i + 1:i + 6]):
            taken = True
        elif any(t.startswith("CALL") for t in texts[target:target + 5]):
            taken = False
        else:  # past narrow accesses (a partial block, a misaligned tensor, thread 0's scalars), not past wide ones
            skipped_wide, skipped_narrow = memory_widths(texts[i + 1:target])
            taken = skipped_narrow and not skipped_wide
        i = target if taken else i + 1
    raise ValueError("the walk did not come back to the loop's start")


def warps_per_sm(registers: int, warps: int) -> int:
    """The warps an SM holds of a kernel whose programs (blocks) have `warps` warps of `registers` registers a
    thread: sm_90 has 64 K registers an SM, allocated 8 a thread at a time, and at most 64 warps and 32 blocks."""
    registers_a_program = -(-registers // 8) * 8 * 32 * warps
    return min(65536 // registers_a_program, 64 // warps, 32) * warps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--clock-ghz", type=float, default=1.98)
    parser.add_argument("--roof-gbps", type=float, default=4236.0)
    parser.add_argument("--measured", help="a gpu_moment_modes.py JSON: its times beside the floors")
    parser.add_argument("--blocks", type=int, help="blocks a program (default: the launcher's BLOCKS)")
    parser.add_argument("--block", type=int, help="elements a block (default: the launcher's BLOCK)")
    parser.add_argument("--num-warps", type=int, help="warps a program (default: the launcher's NUM_WARPS)")
    parser.add_argument("--max-registers", type=int, help="registers a thread at most, 0 for no cap (default: the "
                                                            "launcher's MAX_REGISTERS)")
    parser.add_argument("--cuda", default=next(iter(glob.glob(os.path.join(ROOT, "fused_optim", "_C_cuda*.so"))), None),
                        help="the built CUDA extension (default: the package's, when built)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("sass_per_element.py compiles for a GPU: run it without TRITON_INTERPRET=1.")
    from fused_optim.triton import adam

    for name, value in (("BLOCKS", args.blocks), ("BLOCK", args.block), ("NUM_WARPS", args.num_warps)):
        if value is not None:
            setattr(adam, name, value)
    if args.max_registers is not None:
        adam.MAX_REGISTERS = args.max_registers or None
    measured = {}
    if args.measured:
        with open(args.measured) as file:
            measured = {(row["row"], row["backend"]): row["ms"] for row in json.load(file)["rows"] if "ms" in row}
    cuda = cuda_functions(args.cuda) if args.cuda else {}

    issue_rate = args.sms * 4 * 32 * args.clock_ghz * 1e9  # thread instructions a second
    print(f"{'row':64s} backend regs  SASS/elem  issue floor  bytes at roof  ceiling  warps/SM  BAR/elem  measured")
    for row in [row for row in OPTIMIZERS if row[0] == "AdamW"]:
        kernel, per_thread, blocks, warps = compile_adamw(*row[1:])
        instructions, registers = disassemble(kernel.asm["cubin"])
        paths = {"triton": (registers, warps, whole_block_path(instructions), blocks, per_thread)}
        name = cuda_kernel_name(*row[1:])
        matches = [function for function in cuda if function.startswith(f"void fused_optim::(anonymous namespace)::"
                                                                           f"{name}")]
        if matches:
            instructions, registers = cuda[matches[0]]
            paths["cuda"] = (registers, CUDA_WARPS, whole_block_path(instructions), CUDA_ITERATIONS,
                             CUDA_ELEMENTS_PER_THREAD)
        bytes_ms = step_bytes(*row, NUMEL) / (args.roof_gbps * 1e9) * 1e3
        for backend, (registers, warps, (prologue, trip), trips, per_thread) in paths.items():
            def per_element(count):  # of instructions a thread runs, over the elements it steps
                return (count(prologue) / trips + count(trip)) / per_thread

            instructions_each = per_element(len)
            barriers_each = per_element(lambda path: sum(text.startswith("BAR.SYNC") for text in path))
            floor_ms = NUMEL * instructions_each / issue_rate * 1e3
            ceiling = min(100.0, 100 * bytes_ms / floor_ms)
            ms = measured.get((label(*row), backend))
            print(f"{label(*row):64s} {backend:7s} {registers:4d} {instructions_each:10.1f} {floor_ms:9.3f} ms "
                  f"{bytes_ms:10.3f} ms {ceiling:6.0f} %  {warps_per_sm(registers, warps):8d}  {barriers_each:8.2f}  "
                  + (f"{ms:.3f} ms" if ms else ""))


if __name__ == "__main__":
    main()
