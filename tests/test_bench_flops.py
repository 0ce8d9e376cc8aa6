"""bench/flops.py and bench/report_train.py: executed FLOPs from XLA's HLO, peak, rows."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import flops
import report_train


def _hlo(function: object, *args: tf.Tensor) -> str:
    compiled = tf.function(function, jit_compile=True)
    return compiled.experimental_get_compiler_ir(*args)(stage="optimized_hlo")


def test_hlo_count_of_matmuls_and_a_convolution() -> None:
    a = tf.random.normal((64, 96))
    b = tf.random.normal((96, 80))
    c = tf.random.normal((80, 48))
    images = tf.random.normal((2, 32, 32, 3))
    kernel = tf.random.normal((8, 8, 3, 16))

    def run(a: tf.Tensor, b: tf.Tensor, c: tf.Tensor, x: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
        conv = tf.nn.conv2d(x, k, strides=8, padding="VALID")  # (2, 4, 4, 16)
        return tf.reduce_sum(tf.matmul(tf.matmul(a, b), c)) + tf.reduce_sum(conv)

    counted = flops.hlo_flops(_hlo(run, a, b, c, images, kernel), loop_trips=1)
    expected = 2 * 64 * 96 * 80 + 2 * 64 * 80 * 48 + 2 * (2 * 4 * 4 * 16) * (8 * 8 * 3)
    assert counted["total"] == expected
    assert counted["loops"] == 0


def test_hlo_count_multiplies_loop_bodies_and_sees_merged_duplicates() -> None:
    h = tf.random.normal((16, 32))
    w = tf.random.normal((32, 32))

    def loop(h: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
        def body(i: tf.Tensor, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return i + 1, tf.tanh(tf.matmul(x, w))

        return tf.while_loop(lambda i, _: i < 7, body, (0, h))[1]

    counted = flops.hlo_flops(_hlo(loop, h, w), loop_trips=7)
    assert counted["loops"] == 1
    assert counted["total"] == counted["in_loops"] == 7 * 2 * 16 * 32 * 32

    def twice(h: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
        # The same product twice: XLA runs it once, and the count says so.
        return tf.reduce_sum(tf.matmul(h, w)) + tf.reduce_sum(tf.matmul(h, w))

    assert flops.hlo_flops(_hlo(twice, h, w), loop_trips=1)["total"] == 2 * 16 * 32 * 32


def test_executed_flops_per_path() -> None:
    d = flops.Dims(384, 16, 384, 12, 1536, 192, 21, 5, backbone_dropout=0.0)
    f = flops.forward_flops(d)
    head = f["hv_bilstm"] + f["classifier"]
    one_pass = flops.executed_flops(d, fused=True)["executed"]
    separate = flops.executed_flops(d, fused=False)["executed"]
    # Without backbone dropout the target costs only its head; otherwise the trained blocks too.
    assert separate - one_pass == pytest.approx(f["patch_embedding"] + f["blocks"])
    with_dropout = dataclasses.replace(d, backbone_dropout=0.1)
    assert flops.executed_flops(with_dropout, fused=True)["executed"] - one_pass == (
        pytest.approx(5 * f["block"])
    )
    # Dropout in frozen blocks too (the authors' recipe): nothing is shared, the target is a
    # whole forward pass again.
    authors = dataclasses.replace(d, backbone_dropout=0.1, frozen_dropout=True)
    assert flops.executed_flops(authors, fused=True)["executed"] == pytest.approx(separate)
    assert head > 0


def test_cpu_peak_from_cpuinfo() -> None:
    peak = flops.cpu_peak(fma_units=2)
    assert peak["cores"] >= 1
    if peak["clock_ghz"]:
        lanes = {"AVX-512": 16, "AVX2+FMA": 8, "SSE": 4}[peak["isa"].split(" + ")[0]]
        assert peak["fp32"] == pytest.approx(
            peak["cores"] * peak["clock_ghz"] * 1e9 * lanes * 2 * 2
        )
        assert peak["bf16"] in (peak["fp32"], 2 * peak["fp32"])


def _result(name: str, fused: bool, xla: bool, loss: float, speed: float) -> dict:
    return {
        "name": name, "precision": "fp32", "xla": xla, "fused": fused, "images_per_s": speed,
        "cpu_s_per_image": 1.0, "executed_gflop_per_image": 80.0, "flops_method": "analytic",
        "gflops": 100.0, "ratio": 0.61, "ceiling_gflops": 200.0, "ratio_of_bests": 0.6,
        "ratio_to_fp32_ceiling": 0.61, "fp32_ceiling_gflops": 200.0, "loss": loss,
        "fp32_ceiling": 1, "peak_ratio": 0.3, "cpu_time_peak_ratio": 0.5,
    }  # fmt: skip


def _payload() -> dict:
    return {
        "model": "vit_s16", "image_size": 384, "command": "python bench/train_step.py",
        "machine": "CPU: Test CPU, 2 cores", "date": "2026-12-01", "load_average": [1, 2, 3],
        "cpu_peak": {"fp32": 3.3e11, "bf16": 6.6e11, "cores": 2, "formula": "f",
                     "isa": "AVX-512", "clock_ghz": 2.6},
        "results": [
            _result("fp32, XLA off", True, False, 1.5, 2.0),
            _result("fp32, XLA off, earlier three-pass step", False, False, 1.6, 1.0),
        ],
        "comparisons": {"one_pass_vs_three_pass_xla_off": {
            "wall": 1.7, "best_wall": 1.8, "cpu_time": 1.5, "executed_flops": 0.7}},
    }  # fmt: skip


def test_rows_name_the_machine_and_judge_the_speedup(tmp_path: Path) -> None:
    rows = report_train.train_step_rows(_payload())
    assert all(r["machine"].startswith("CPU: Test CPU, 2 cores (AVX") for r in rows)
    assert all(r["load"] == "1, 2, 3" for r in rows)
    assert len(rows) == 3  # one configuration of the current step: no defaults row
    assert rows[0]["verdict"] == "met" and "0.3 of the fp32 FMA peak" in rows[0]["value"]
    assert rows[1]["verdict"] == "reference"
    # 1.7x by wall clock but 1.5x by CPU time: load must not flatter it.
    assert rows[2]["verdict"] == "**not met**" and "1.5x" in rows[2]["value"]
    gpu = report_train.gpu_rows(tmp_path)
    assert len(gpu) == 3 and all("no GPU lent" in r["value"] for r in gpu)


def test_pseudo_mask_rows_say_what_is_projected() -> None:
    payload = {
        "cores": 2, "images": 4, "image_size": 480, "images_per_s_all_cores": 0.2,
        "images_per_s_one_worker": 0.15, "speedup": 1.333, "postprocess_cpu_s_per_image": 1.5,
        "forward_gflop_per_image": 330.0, "projected_trainaug_here_h": 14.7,
        "cpu_s_per_image": 7.5, "projected_trainaug_here_cpu_time_h": 11.0,
        "projected_trainaug_one_gpu_h": {"8_host_cores_h": 0.55, "16_host_cores_h": 0.28},
        "command": "python bench/pseudo_masks.py", "machine": "CPU: Test CPU, 2 cores",
        "date": "2026-12-01", "load_average": [1, 2, 3],
    }  # fmt: skip
    measured, projected = report_train.pseudo_mask_rows(payload)
    assert measured["verdict"] == "met" and "1.333x" in measured["value"]
    assert "projection" in projected["goal"] and "14.7 h" in projected["value"]
    assert "**11.0 h** by CPU time" in projected["value"]
    assert "0.55 h" in projected["value"] and "assumed 40%" in projected["value"]


def test_recipe_rows_are_the_same_figures_reported_not_judged() -> None:
    rows = report_train.recipe_step_rows(_payload())
    plain = report_train.train_step_rows(_payload())
    assert [r["value"] for r in rows] == [r["value"] for r in plain]
    assert all("paper config (authors' dropout recipe)" in r["figure"] for r in rows)
    assert {r["verdict"] for r in rows} == {"reported"}
