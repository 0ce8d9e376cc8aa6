"""bench/profile_step.py: op time summed from a profiler trace, by op type and model part."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import profile_step  # noqa: E402


def _trace(path: Path) -> None:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    names = {
        1: ("encoderblock_3/Dense_0/MatMul:MatMul", "_MklBatchMatMulV2"),
        2: ("gradient_tape/encoderblock_9/Gelu/mul/Mul:Mul", "Mul"),
        3: ("vertical/forward_lstm/while/body/MatMul:MatMul", "_MklMatMul"),
        4: ("ExecutorState::Process", ""),  # bookkeeping: not counted
        5: ("adam/update/Mul:Mul", "Mul"),
    }
    for key, (name, shown) in names.items():
        plane.event_metadata[key].id = key
        plane.event_metadata[key].name = name
        plane.event_metadata[key].display_name = shown
    compute = plane.lines.add(name="tf_Compute/1")
    for key, ps in [(1, 3_000_000_000), (2, 500_000_000), (3, 250_000_000), (4, 9e12), (5, 1e9)]:
        compute.events.add(metadata_id=key, duration_ps=int(ps))
    other = plane.lines.add(name="python")  # the Python thread's events are not op time
    other.events.add(metadata_id=1, duration_ps=7_000_000_000)
    path.write_bytes(space.SerializeToString())


def test_op_time_by_type_and_part(tmp_path: Path) -> None:
    _trace(tmp_path / "t.xplane.pb")
    seconds, calls, parts = profile_step.op_times(str(tmp_path / "t.xplane.pb"))
    assert dict(seconds) == pytest.approx(
        {"_MklBatchMatMulV2": 3e-3, "Mul": 1.5e-3, "_MklMatMul": 2.5e-4}
    )
    assert calls["Mul"] == 2
    assert dict(parts) == pytest.approx(
        {
            "encoder blocks": 3e-3,
            "gradient encoder blocks": 5e-4,
            "HV-BiLSTM": 2.5e-4,
            "optimizer": 1e-3,
        }
    )
