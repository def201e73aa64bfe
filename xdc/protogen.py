"""Regenerates the Python stubs in xdc/v1 from proto/xdc/v1 (`make proto`).

The stubs are committed so that an installed xdc needs no protoc; tests/test_proto.py
regenerates them into a temporary folder and fails when the committed ones are stale.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT  # protoc writes xdc/v1/*_pb2*.py under the output root


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Runs protoc for every proto/xdc/v1/*.proto, writing under out_root; returns the files."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "xdc" / "v1").glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_root / "xdc" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(pathlib.Path(tmp))
        target = OUT_DIR / "xdc" / "v1"
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("*_pb2*.py*"):
            stale.unlink()
        for f in files:
            (target / f.name).write_bytes(f.read_bytes())
            print(f"wrote xdc/v1/{f.name}")
    (OUT_DIR / "xdc" / "v1" / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
