"""The static performance model (benchmarks/kernel_model.py): its SASS reading on a hand-written
listing, and one real run at one shape whose numbers are checked against hand-computed bytes,
occupancy and the model's own formulas."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # a Linux-only dependency; the model compiles with it

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import kernel_model  # noqa: E402

# A made-up sm_90 listing: a straight-line prologue, one loop (0x0030-0x0070: the backward branch
# at 0x0070) holding an HGMMA and a synchronous LDG, and ptxas' final self-loop.
LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R20, SR_CTAID.X ;                     /* 0x0000000000147919 */
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;              /* 0x0000000000147919 */
        /*0030*/                   MUFU.EX2 R3, R2 ;                         /* 0x0000000000147919 */
        /*0040*/               @P0 LDG.E.U16 R5, desc[UR4][R6.64] ;          /* 0x0000000000147919 */
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0060*/                   FFMA R7, R3, R5, R7 ;                     /* 0x0000000000147919 */
        /*0070*/              @!P2 BRA 0x30 ;                                /* 0xffffffcc00c8a947 */
        /*0080*/                   STG.E [R8.64], R7 ;                       /* 0x0000000000147919 */
        /*0090*/                   EXIT ;                                    /* 0x0000000000147919 */
        /*00a0*/                   BRA 0xa0;                                 /* 0xfffffffc00fc7947 */
"""


def test_sass_reader_finds_the_loop_and_classifies_its_instructions() -> None:
    instructions, loops = kernel_model.parse_sass(LISTING)
    assert len(instructions) == 10  # not the self-branch
    assert loops == [(0x30, 0x70)]
    code = kernel_model.KernelCode.from_sass(LISTING)
    assert code.loop_body == ["MUFU", "LDG", "HGMMA", "FFMA", "BRA"]
    assert code.outside == ["LDC", "S2R", "LDG", "STG", "EXIT"]
    # the loop's LDG (0x0040) writes R5, read by the FFMA two instructions later (HGMMA between)
    assert code.sync_load_distances == [1]
    assert code.exposed_cycles_per_trip(warps=8) == kernel_model.LATENCY_CYCLES - 1 * 8 / 4
    assert not code.loads_after_softmax  # it has no asynchronous copy
    later_copy = LISTING.replace("/*0090*/                   EXIT", "/*0090*/                   LDGSTS.E.BYPASS.128 [R186], desc[UR4][R4.64]")
    assert kernel_model.KernelCode.from_sass(later_copy).loads_after_softmax
    counts = kernel_model.classify(code.loop_body)
    assert counts["MUFU"] == 1 and counts["HGMMA"] == 1 and counts["FFMA/FMUL/FADD"] == 1
    assert counts["LDG/STG"] == 1 and counts["other"] == 1 and counts["total"] == 5


# Outer loop 0x0030-0x0090 with a nested one 0x0040-0x0070 (both hold an HGMMA): the nested
# loop's LDG (0x0040, read two instructions later by the FFMA) stalls every nested trip, the outer
# loop's LDG (0x0080, its value read by the MUFU at the next outer trip's start) does not.
NESTED_LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R20, SR_CTAID.X ;                     /* 0x0000000000147919 */
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;              /* 0x0000000000147919 */
        /*0030*/                   MUFU.EX2 R3, R2 ;                         /* 0x0000000000147919 */
        /*0040*/                   LDG.E.128 R5, desc[UR4][R6.64] ;          /* 0x0000000000147919 */
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0060*/                   FFMA R7, R3, R5, R7 ;                     /* 0x0000000000147919 */
        /*0070*/              @!P2 BRA 0x40 ;                                /* 0xffffffcc00c8a947 */
        /*0080*/                   LDG.E R2, desc[UR4][R4.64] ;              /* 0x0000000000147919 */
        /*0090*/              @!P3 BRA 0x30 ;                                /* 0xffffffcc00c8a947 */
        /*00a0*/                   EXIT ;                                    /* 0x0000000000147919 */
"""


def test_sass_reader_charges_a_nested_loops_synchronous_load_per_nested_trip() -> None:
    code = kernel_model.KernelCode.from_sass(NESTED_LISTING)
    assert code.inner_body == ["LDG", "HGMMA", "FFMA", "BRA"]
    assert code.inner_sync_load_distances == [1]  # LDG 0x40 -> FFMA 0x60, the HGMMA between
    assert code.sync_load_distances == [1]  # LDG 0x80 -> (BRA) -> MUFU 0x30 of the next trip
    assert code.exposed_cycles_per_trip(warps=8, inner=True) == kernel_model.LATENCY_CYCLES - 1 * 8 / 4


def test_sass_reader_finds_the_main_loops_l2_prefetch() -> None:
    # CCTL.E.PF2 is PTX prefetch.global.L2 (the backward's ask for the next row block's x, change
    # 17): it counts in the main loop outside its nested loop, not inside the nested loop, and a
    # CCTL that invalidates L1 (the forward's acquire atomic) is no prefetch.
    outer_load = "/*0080*/                   LDG.E R2, desc[UR4][R4.64] ;"
    inner_load = "/*0040*/                   LDG.E.128 R5, desc[UR4][R6.64] ;"
    assert outer_load in NESTED_LISTING and inner_load in NESTED_LISTING
    assert not kernel_model.KernelCode.from_sass(NESTED_LISTING).prefetches_to_l2
    prefetch = "/*0080*/                   CCTL.E.PF2 [R4] ;"
    assert kernel_model.KernelCode.from_sass(NESTED_LISTING.replace(outer_load, prefetch)).prefetches_to_l2
    invalidate = "/*0080*/                   CCTL.IVALL ;"
    assert not kernel_model.KernelCode.from_sass(NESTED_LISTING.replace(outer_load, invalidate)).prefetches_to_l2
    inner_prefetch = "/*0040*/                   CCTL.E.PF2 [R6] ;"
    assert not kernel_model.KernelCode.from_sass(NESTED_LISTING.replace(inner_load, inner_prefetch)).prefetches_to_l2


def test_an_l2_prefetch_shortens_every_nested_copy_wait_but_each_programs_first() -> None:
    # The same backward code with and without the prefetch: the exposed time differs by
    # (trips - 1) x (DRAM - L2 latency) per program that has real row blocks, over the SMs' slots.
    outer_load = "/*0080*/                   LDG.E R2, desc[UR4][R4.64] ;"
    without = kernel_model.KernelCode.from_sass(NESTED_LISTING)
    with_prefetch = kernel_model.KernelCode.from_sass(
        NESTED_LISTING.replace(outer_load, "/*0080*/                   CCTL.E.PF2 [R4] ;"))
    with_prefetch.sync_load_distances = without.sync_load_distances  # only the prefetch differs
    stream = next(s for s in kernel_model.STREAMS if s.name == "video")
    usage = {"registers": 128, "spill_stack_bytes": 0, "shared_memory_bytes": 1024}  # 2 CTAs of 8 warps
    tile = (64, 64, 8)
    rows = [kernel_model.model_case("backward", stream, 128, "bf16", "120-300", code, usage, tile, "half")
            for code in (without, with_prefetch)]
    trips, _, _ = kernel_model.programs_and_trips("backward", kernel_model.paper_lengths("120-300"), 8, 256, tile, 132)
    saved_cycles = sum(t - 1 for t in trips if t) * (kernel_model.LATENCY_CYCLES - kernel_model.L2_LATENCY_CYCLES)
    saved_us = saved_cycles / (132 * 2 * 1.755e9) * 1e6
    assert saved_us > 0
    assert rows[0]["h200_exposed_us"] - rows[1]["h200_exposed_us"] == pytest.approx(saved_us, rel=1e-9)
    assert rows[1]["prefetches_to_l2"] and not rows[0]["prefetches_to_l2"]


def test_occupancy_and_lengths_by_hand() -> None:
    # 186 registers: 5,952 per warp (units of 256), x 8 warps = 47,616 of 65,536 -> 1 CTA
    assert kernel_model.ctas_per_sm(186, 90112, 8) == 1
    # 128 registers x 4 warps = 16,384 -> 4 by registers, 233,472 // (49,152 + 1,024) = 4 by shared memory
    assert kernel_model.ctas_per_sm(128, 49152, 4) == 4
    assert sorted(kernel_model.paper_lengths("120-300", batch=3)) == [120, 210, 300]
    assert kernel_model.paper_lengths("full", batch=2) == [300, 300]
    # audio: 160 programs < 2 x 132 SMs -> every video in 3 splits (the launcher's rule), its
    # 1,200 real rows shared in 64-row blocks: 448 + 448 + 304 rows = 7 + 7 + 5 trips
    trips, split_videos, splits = kernel_model.programs_and_trips("forward", [300] * 160, 4, 64, (64, 64, 8), 132)
    assert (split_videos, splits) == (160, 3) and trips == [7, 7, 5] * 160
    # video: 320 programs = 2.42 waves -> the last 28 videos in halves of 19 trips (2 D blocks each)
    trips, split_videos, splits = kernel_model.programs_and_trips("forward", [300] * 160, 8, 256, (64, 128, 8), 132)
    assert (split_videos, splits) == (28, 2) and trips == [38] * 264 + [19] * 112
    # equal programs: ceil(waves) / waves; the split plan: 2 waves of 38 trips + one of 19 = 95
    # against a mean of 160 x 2 x 38 / 132 trips per SM
    assert kernel_model.wave_quantisation([38] * 320, 132) == pytest.approx(3 / (320 / 132))
    assert kernel_model.wave_quantisation(trips, 132) == pytest.approx(95 / (160 * 2 * 38 / 132))
    # backward, video: 38 row blocks per video in head runs of 10, 10, 9 (every video's), then tail
    # runs of 3, 3, 3; a 100-frame video (800 rows: 13 real blocks) has 10 + 3 trips in its head
    # runs and none in its tail (padding: zeros only)
    trips, _, _ = kernel_model.programs_and_trips("backward", [300] * 159 + [100], 8, 256, (64, 64, 8), 132)
    assert trips == [10, 10, 9] * 159 + [10, 3, 0] + [3, 3, 3] * 159 + [0, 0, 0]


def test_the_measurement_without_tail_runs_plans_head_runs_only() -> None:
    plan = kernel_model.ops._backward_plan
    assert plan(160, 38, 4, 132) == (10, 9, 3)
    with kernel_model.backward_plan_without_tail():
        assert kernel_model.ops._backward_plan(160, 38, 4, 132) == (10, 0, 10)
        assert kernel_model.ops._backward_programs(160, 38, (10, 0, 10)) == 160 * 4
    assert kernel_model.ops._backward_plan is plan


def test_the_measurement_without_prefetch_switches_the_launchers_rule_off_and_back() -> None:
    rule = kernel_model.ops._prefetches_next_x
    with kernel_model.backward_without_prefetch():
        assert kernel_model.ops._prefetches_next_x(False, 128) is False
    assert kernel_model.ops._prefetches_next_x is rule


@pytest.mark.slow
def test_kernel_model_runs_for_the_video_stream_and_is_self_consistent(tmp_path) -> None:
    """One real sm_90 compile (forward, the dL/dy pass and backward, video K=128 bf16, full lengths)
    in a subprocess without TRITON_INTERPRET; the bytes are computed here by hand."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_model.py"), "--streams", "video", "--clusters", "128",
         "--dtypes", "bf16", "--lengths", "full", "--no-measure", "--output-dir", str(tmp_path), "--name", "model"],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "model.json").read_text())
    rows = {row["kernel"]: row for row in results["rows"]}
    assert set(rows) == {"forward", "grad_y", "backward"}
    assert results["assumptions"] and "assumptions" in (tmp_path / "model.md").read_text()

    # B=160 videos x 300 frames x G=8 rows, D=256, K=128, 2-byte elements
    rows_real = 160 * 300 * 8
    read = rows_real * (256 + 128 + 1) * 2 + 160 * 8
    forward_bytes = read + 128 * 256 * 4 + 160 * 128 * 256 * 2 + 160 * 128 * 4
    backward_bytes = read + 160 * 128 * 256 * 2 + 160 * 128 * 4 + rows_real * (256 + 128 + 1) * 2
    assert rows["forward"]["bytes_MB"] == pytest.approx(forward_bytes / 1e6)
    assert rows["backward"]["bytes_MB"] == pytest.approx(backward_bytes / 1e6)
    # the dL/dy pass: dL/dy in fp32 read, its bf16 copy written, a_sum read, the row constant
    # written (B x K fp32 each), the centroids read and dL/dc written (K x D fp32 each)
    grad_y_bytes = 160 * 128 * 256 * (4 + 2) + 2 * 160 * 128 * 4 + 2 * 128 * 256 * 4
    assert rows["grad_y"]["bytes_MB"] == pytest.approx(grad_y_bytes / 1e6)
    # one program per cluster, 32 videos (a tile of 8,192 values over whole rows of 256) a step
    assert rows["grad_y"]["programs"] == 128 and rows["grad_y"]["tile"] == "32x256x8"
    # programs: forward one per (video, D block), the last wave's 28 videos (56 programs) in halves
    block_r, block_d, _ = (int(v) for v in rows["forward"]["tile"].split("x"))
    assert (block_r, block_d) == (64, 128) and rows["forward"]["programs"] == 2 * (132 + 28 * 2)
    assert rows["forward"]["split_videos"] == 28 and rows["forward"]["splits"] == 2
    # backward: one per run of row blocks; 2,400 rows = 38 blocks of 64: head runs of 10, 10, 9
    # (about 4 programs per SM: 4 x 132 / 160 videos -> 4 per video), then tail runs of 3, 3, 3
    block_r, block_d, _ = (int(v) for v in rows["backward"]["tile"].split("x"))
    assert block_r == 64 and rows["backward"]["programs"] == 160 * (3 + 3)

    for row in rows.values():
        assert row["spill_stack_bytes"] == 0
        assert (row["loop_HGMMA"] > 0) == (row["kernel"] != "grad_y") and row["loop_MUFU"] >= 0
        classes = sum(row[f"loop_{name}"] for name in (*kernel_model.CLASSES, "other"))
        assert classes == row["loop_total"]
        warps = int(row["tile"].split("x")[2])
        assert row["ctas_per_sm"] == kernel_model.ctas_per_sm(row["registers"], row["shared_memory_bytes"], warps)
        for gpu, bandwidth in (("h100", 3.35e12), ("h200", 4.3e12)):
            assert row[f"{gpu}_dram_us"] == pytest.approx(row["bytes_MB"] * 1e6 / bandwidth * 1e6)
            floor = max(row[f"{gpu}_{name}_us"] for name in ("issue", "mufu", "tensor", "dram"))
            assert row[f"{gpu}_predicted_us"] == pytest.approx(
                floor * row["quantisation"] + row[f"{gpu}_exposed_us"], rel=1e-3)  # rounded to 1e-4
            assert row[f"{gpu}_x_dram"] == pytest.approx(row[f"{gpu}_predicted_us"] / row[f"{gpu}_dram_us"])
    # the issue floor: warp instructions / (4 per cycle x 132 SMs x 1.755 GHz); the forward's
    # loop runs once per row block of each program
    forward = rows["forward"]
    trips = 160 * 2 * math.ceil(300 * 8 / int(forward["tile"].split("x")[0]))  # split or not
    lower = trips * forward["loop_total"] * int(forward["tile"].split("x")[2]) / (4 * 132 * 1.755e9) * 1e6
    assert lower <= forward["h100_issue_us"] <= lower * 1.1  # the rest: code outside the loop
    combined = results["forward_plus_backward"][0]
    assert combined["h200_predicted_us"] == pytest.approx(sum(row["h200_predicted_us"] for row in rows.values()))
