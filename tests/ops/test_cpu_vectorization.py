"""Build check: the hot row loops of rlhf_fast._C stay vectorised.

Reads the disassembly of the built extension (objdump) and counts, in each x86-64 clone of each
hot row function, the packed fused multiply-adds of that clone's vector width: the exp alone is 9
of them per vectorised loop (3 for the range reduction, 6 for the polynomial), while a loop that
fell back to scalar code (as the entropy forward did before, 10x slower) has none. The default (SSE2) clone has no FMA: it is checked for
packed multiplies instead.
"""
import platform
import re
import shutil
import subprocess

import pytest

C = pytest.importorskip("rlhf_fast._C", reason="the C++ extension is not built")

pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 clones only"),
    pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)"),
]

DTYPES = ["float", "rlhf_fast::half_t", "rlhf_fast::bf16_t"]
HOT = (
    [f"logprobs_row<{t}, {e}>" for t in DTYPES for e in ("true", "false")]
    + [f"logprobs_bwd_row<{t}, {e}>" for t in DTYPES for e in ("true", "false")]
    + [f"full_kl_row<{x}, {y}>" for x in DTYPES for y in DTYPES]
    + [f"full_kl_bwd_row<{a}, {x}, {y}>" for a in ("true", "false") for x in DTYPES for y in DTYPES]
    # the softcap variants (fast_tanh on load; tests/ops/test_logit_transforms.py)
    + [f"logprobs_cap_row<{t}, {e}>" for t in DTYPES for e in ("true", "false")]
    + [f"logprobs_cap_bwd_row<{t}, {e}>" for t in DTYPES for e in ("true", "false")]
    + [f"full_kl_cap_row<{x}, {y}>" for x in DTYPES for y in DTYPES]
    + [f"full_kl_cap_bwd_row<{a}, {x}, {y}>" for a in ("true", "false") for x in DTYPES for y in DTYPES]
)
# clone -> (regex of one packed instruction, how many a vectorised exp loop has at least)
CLONES = {
    "arch_x86_64_v4": (r"\bvf(?:n)?m(?:add|sub)\d{3}ps\b[^\n]*%zmm", 7),
    "arch_x86_64_v3": (r"\bvf(?:n)?m(?:add|sub)\d{3}ps\b[^\n]*%ymm", 7),
    "default": (r"^\s*[0-9a-f]+:\s+mulps\b", 7),
}


@pytest.fixture(scope="module")
def functions():
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", C.__file__], capture_output=True,
                         text=True, check=True).stdout
    out = {}
    for block in re.split(r"\n(?=[0-9a-f]+ <)", asm):
        head, _, body = block.partition("\n")
        m = re.match(r"[0-9a-f]+ <(.*)>:$", head)
        if m:
            out[m.group(1)] = body
    if not any("logprobs_row<" in name for name in out):
        pytest.skip("rlhf_fast._C is stripped: no symbols to check")
    return out


def _clone_body(functions, name, clone):
    hits = [body for sym, body in functions.items()
            if f"::{name}(" in sym and sym.endswith(f"[clone .{clone}]")]
    assert len(hits) == 1, f"{name} [clone .{clone}]: found {len(hits)} symbols (was it renamed or inlined?)"
    return hits[0]


@pytest.mark.parametrize("clone", list(CLONES))
@pytest.mark.parametrize("name", HOT)
def test_hot_loop_is_vectorised(functions, name, clone):
    pattern, at_least = CLONES[clone]
    n = len(re.findall(pattern, _clone_body(functions, name, clone), flags=re.MULTILINE))
    assert n >= at_least, (f"{name} [clone .{clone}] has {n} packed FMA/multiply instructions (< {at_least}): "
                           "its loop fell off the vectorised path; compile with -fopt-info-vec-missed to see why")


def test_the_check_sees_scalar_code(functions):
    """The pattern counts packed FMAs only: a scalar FMA (ss) never counts, nor does a loop without FMAs."""
    pattern, _ = CLONES["arch_x86_64_v4"]
    assert not re.findall(pattern, "  1806d1:\tvfmadd231ss %xmm4,%xmm7,%xmm3\n", flags=re.MULTILINE)
    assert re.findall(pattern, "  1805c5:\tvfmadd132ps %zmm3,%zmm11,%zmm1\n", flags=re.MULTILINE)
    body = _clone_body(functions, "zero_row<float>", "arch_x86_64_v4")
    assert not re.findall(pattern, body, flags=re.MULTILINE)
