"""The readers behind ``bnbench inspect``, on small hand-written inputs: SASS (loops, widths, cp.async,
barriers), cuobjdump's resource usage, TTIR pointer accesses, the occupancy model and target names."""

from __future__ import annotations

import pytest

from bnbench.kernels._facts import resource_usage
from bnbench.kernels._sass import access_bits, loops, parse_sass, summarize
from bnbench.kernels._target import TARGETS, occupancy, parse_target
from bnbench.kernels._ttir import pointer_accesses, tensor_passes

# cuobjdump -sass style: absolute branch targets. One loop 0x0040..0x00c0 with a 128-bit load, a cp.async and a
# barrier; a 32-bit load, a barrier and a store outside; the self-branch padding at the end is not a loop.
CUOBJDUMP = """
        Function : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/              @!P1 LDG.E R6, desc[UR14][R2.64] ;          /* 0x0000000e02069981 */
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;          /* 0x0000000000007b1d */
        /*0030*/              @!P0 BRA 0x100 ;                            /* 0x0000000c00f88947 */
        /*0040*/               @P0 LDG.E.128 R20, desc[UR14][R30.64] ;    /* 0x0000000e1e140981 */
        /*0050*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ; /* 0x00000000 */
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;          /* 0x0000000000007b1d */
        /*00c0*/               @P0 BRA 0x40 ;                             /* 0xfffffff000840947 */
        /*0100*/                   STG.E.64 desc[UR4][R2.64], R8 ;        /* 0x00000000 */
        /*0110*/                   EXIT ;                                 /* 0x000000000000794d */
        /*0120*/                   BRA 0x120;                             /* 0xfffffffc00fc7947 */
"""

# nvdisasm style: labels, and an inner loop nested in an outer one (the barrier is in both: counted once)
NVDISASM = """
.L_x_0:
        /*0000*/                   LDG.E.U16 R2, desc[UR4][R2.64] ;
.L_x_1:
        /*0010*/                   LDG.E.64 R4, desc[UR4][R4.64] ;
        /*0020*/                   BAR.SYNC 0x0 ;
        /*0030*/               @P1 BRA `(.L_x_1) ;
        /*0040*/               @P2 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
"""


def test_cuobjdump_sass_loops_widths_cp_async_and_barriers():
    code = parse_sass(CUOBJDUMP)
    assert [i.opcode for i in code][:2] == ["LDC", "LDG.E"]
    assert code[1].predicated and not code[0].predicated
    assert [(lp.start, lp.end) for lp in loops(code)] == [(0x40, 0xC0)]
    s = summarize(CUOBJDUMP)
    assert (s.loops, s.loops_with_loads) == (1, 1)
    assert s.ldg_bits == {32: 1, 128: 1} and s.stg_bits == {64: 1}
    assert s.main_load_bits == 128  # the loop's loads, not the one before it
    assert (s.ldgsts, s.ldgsts_in_loops, s.pipelined) == (1, 1, True)
    assert (s.bar_sync, s.bar_sync_in_loops) == (2, 1)


def test_nvdisasm_labels_and_nested_loops():
    s = summarize(NVDISASM)
    assert s.loops == 2 and s.loops_with_loads == 2
    assert s.bar_sync_in_loops == 1
    assert s.ldg_bits == {16: 1, 64: 1}
    assert s.main_load_bits == 64  # 64 bits moved by one load beat 16 by the other
    assert not s.pipelined


def test_a_kernel_without_loops_reports_its_widest_traffic():
    text = """
        /*0000*/ LDG.E R1, desc[UR4][R2.64] ;
        /*0010*/ LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/ LDG.E.128 R4, desc[UR4][R6.64] ;
        /*0030*/ EXIT ;
    """
    s = summarize(text)
    assert s.loops == 0 and s.main_load_bits == 128 and s.bar_sync_in_loops == 0


@pytest.mark.parametrize(
    ("opcode", "bits"),
    [("LDG.E", 32), ("LDG.E.64", 64), ("LDG.E.128.CONSTANT", 128), ("LDG.E.U16", 16), ("LDG.E.S8", 8),
     ("LDGSTS.E.BYPASS.LTC128B.128", 128)],
)  # fmt: skip
def test_access_bits(opcode, bits):
    assert access_bits(opcode) == bits


def test_resource_usage_line():
    text = """Resource usage:
 Common:
  GLOBAL:0
 Function k:
  REG:56 STACK:8 SHARED:1024 LOCAL:4 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = resource_usage(text)
    assert usage["REG"] == 56 and usage["STACK"] == 8 and usage["LOCAL"] == 4 and usage["SHARED"] == 1024
    assert usage["CONSTANT[0]"] == 600


# TTIR: x streamed in a loop (pointer carried through iter_args) after a pivot load of one tile; y stored in the
# loop; w loaded once outside loops (its only load: one pass); out stored once.
TTIR = """
module {
  tt.func public @k(%x_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32} loc("x_ptr"(#loc)), %y_ptr: !tt.ptr<f32> loc(#loc), %w_ptr: !tt.ptr<f32> loc(#loc), %out: !tt.ptr<f32> loc(#loc), %n: i32 loc(#loc)) attributes {noinline = false} {
    %0 = tt.splat %x_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>> loc(#loc1)
    %pivot = tt.load %0 : tensor<128x!tt.ptr<f32>> loc(#loc2)
    %w = tt.load %w_ptr : !tt.ptr<f32> loc(#loc3)
    %1 = tt.splat %y_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>> loc(#loc1)
    %acc:2 = scf.for %i = %c0 to %n step %c1 iter_args(%p = %0, %s = %cst) -> (tensor<128x!tt.ptr<f32>>, f32)  : i32 {
      %v = tt.load %p : tensor<128x!tt.ptr<f32>> loc(#loc4)
      %r = "tt.reduce"(%v) <{axis = 0 : i32}> ({
      ^bb0(%a: f32, %b: f32):
        %t = arith.addf %a, %b : f32
        tt.reduce.return %t : f32
      }) : (tensor<128xf32>) -> f32
      %2 = tt.addptr %1, %off : tensor<128x!tt.ptr<f32>>, tensor<128xi32>
      tt.store %2, %v : tensor<128x!tt.ptr<f32>>
      %next = tt.addptr %p, %off : tensor<128x!tt.ptr<f32>>, tensor<128xi32>
      scf.yield %next, %r : tensor<128x!tt.ptr<f32>>, f32
    } loc(#loc5)
    tt.store %out, %acc#1 : !tt.ptr<f32>
    tt.return
  }
}
"""


def test_ttir_passes_follow_pointers_through_loops_and_ignore_a_pivot():
    acc = pointer_accesses(TTIR)
    assert (acc[0].loads_in_loops, acc[0].loads_outside, acc[0].passes) == (1, 1, 1)
    assert tensor_passes(TTIR, ["x", "y", "w", "out", "n"]) == {"x": 1, "y": 1, "w": 1, "out": 1}
    with pytest.raises(ValueError, match="5 arguments"):
        tensor_passes(TTIR, ["x"])


def test_occupancy_model_on_sm90():
    t = TARGETS["sm_90"]
    # 56 registers x 32 threads = 1792 per warp (a multiple of 256): 65536 / (1792 * 4) = 9 blocks of 4 warps
    occ = occupancy(t, registers=56, num_warps=4, shared_bytes=2048)
    assert (occ.blocks_per_sm, occ.limited_by, occ.fraction) == (9, "registers", 36 / 64)
    # 33 registers round up to 40 per thread (1280 per warp)
    assert occupancy(t, registers=33, num_warps=8, shared_bytes=0).blocks_per_sm == 65536 // (1280 * 8)
    assert occupancy(t, registers=16, num_warps=1, shared_bytes=0).limited_by == "blocks"  # 32 blocks at most
    assert occupancy(t, registers=16, num_warps=16, shared_bytes=0).limited_by == "warps"  # 64 warps at most
    smem = occupancy(t, registers=16, num_warps=1, shared_bytes=100 * 1024)  # + 1 KB reserved per block
    assert (smem.blocks_per_sm, smem.limited_by) == (2, "shared memory")
    with pytest.raises(ValueError, match="num_warps"):
        occupancy(t, registers=16, num_warps=0, shared_bytes=0)


def test_target_names():
    assert parse_target("sm_90").sms == 132 and parse_target("90").arch == 90 and parse_target("SM80").arch == 80
    with pytest.raises(ValueError, match=r"sm_12.*valid targets"):
        parse_target("sm_12")
