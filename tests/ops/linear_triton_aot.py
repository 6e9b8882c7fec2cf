"""Compiles the fused from-hidden kernels (rlhf_fast/ops/linear_triton.py) ahead of time for an sm_90
GPU, without one: Triton's own PTX pipeline and bundled ptxas. Run in a subprocess without
TRITON_INTERPRET (the interpreter's kernels cannot be compiled) by test_linear_triton.py; prints one
JSON line per kernel variant: shared memory bytes and counts of the instructions that matter."""
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rlhf_fast.ops import linear_triton as L  # noqa: E402

POINTERS = {"t_ptr": "*i64"}
FLOATS = ("mul", "cap_pre")
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def signature(fn, dtype, constexprs):
    """Triton signature of ``fn``: h / w / b in ``dtype``, other pointers fp32, scalars i32 / fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("h_ptr", "w_ptr", "b_ptr"):
            sig[name] = f"*{DTYPES[dtype]}"
        elif name.endswith("_ptr"):
            sig[name] = POINTERS.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def compile_one(fn, dtype, constexprs, tiles):
    sig = signature(fn, dtype, constexprs)
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in constexprs.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    ptx = k.asm["ptx"]
    return {"shared": k.metadata.shared, "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "atomics": sorted(set(re.findall(r"(?:red|atom)\.global[.a-z0-9]*", ptx))), "cubin": "cubin" in k.asm}


def main():
    for dtype in (torch.bfloat16, torch.float32):
        tiles = L.pick_tiles(8192, 4096, 151936, dtype)
        blocks = {"BLOCK_N": tiles.block_n, "BLOCK_V": tiles.block_v, "BLOCK_K": tiles.block_k}
        flags = {"UPCAST": False, "DOT_PRECISION": "tf32" if dtype != torch.float32 else "ieee"}
        common = {"WITH_ENTROPY": True, "HAS_BIAS": True, "SOFTCAP": True, **flags, **blocks}
        fwd = compile_one(L._linear_logprobs_fwd_kernel, dtype, common, tiles)
        bwd = compile_one(L._linear_logprobs_bwd_kernel, dtype,
                          {**common, "WANT_H": True, "WANT_W": True, "WANT_B": True, "GROUP_V": 8}, tiles)
        for name, res in (("fwd", fwd), ("bwd", bwd)):
            print(json.dumps({"kernel": name, "dtype": DTYPES[dtype], **res}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
