"""The committed generated protobuf code must equal a fresh generation from proto/."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    if shutil.which("protoc-gen-mypy") is None:
        raise AssertionError("mypy-protobuf (protoc-gen-mypy) must be installed: pip install -e .[dev]")
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, cwd=ROOT)
    fresh = tmp_path / "dept_comm" / "pb"
    committed = ROOT / "dept_comm" / "pb"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated, "protoc generated nothing"
    for name in generated:
        assert filecmp.cmp(fresh / name, committed / name, shallow=False), (
            f"dept_comm/pb/{name} differs from proto/; run scripts/gen_proto.sh and commit"
        )


def test_enum_zero_values_are_unspecified() -> None:
    from dept_comm.pb import service_pb2, tensor_pb2

    for module in (tensor_pb2, service_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name
        for msg in module.DESCRIPTOR.message_types_by_name.values():
            for enum in msg.enum_types:
                assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name
    assert sys.modules["dept_comm.pb.tensor_pb2"].DESCRIPTOR.package == "dept.v1"
