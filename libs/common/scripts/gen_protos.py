"""Generate conveyor.v1 stubs from protos/ into a source tree (default: libs/common/src).

Usage: python libs/common/scripts/gen_protos.py [OUT_DIR]
`make proto` writes the committed stubs; `make proto-check` writes into a
temporary directory and diffs, so stale stubs fail CI.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[3]
PROTOS = ROOT / "protos"
PACKAGE = Path("conveyor/v1")
DESCRIPTORS = "descriptors.binpb"
INIT = '"""Generated from protos/conveyor/v1; do not edit: make proto."""\n'


def _plugin(name: str) -> str:
    # An unactivated venv does not have its bin/ on PATH, so name the plugins explicitly.
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{path} not found: run `make venv` first")
    return f"--plugin={name}={path}"


def generate(out: Path) -> None:
    target = out / PACKAGE
    if target.exists():
        for old in [*target.glob("*_pb2*"), target / DESCRIPTORS]:
            old.unlink(missing_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / PACKAGE).glob("*.proto"))
    services = [p for p in protos if p.endswith("_service.proto")]
    well_known = str(Path(protoc.__file__).parent / "_proto")
    base = ["protoc", f"-I{PROTOS}", f"-I{well_known}", _plugin("protoc-gen-mypy"), _plugin("protoc-gen-mypy_grpc")]
    steps = [
        [*base, f"--python_out={out}", f"--mypy_out={out}", *protos],
        # With the comments (generated modules drop them): server reflection serves this set,
        # so `grpcurl describe` shows the documentation of every RPC, message and field.
        [*base, f"--descriptor_set_out={target / DESCRIPTORS}", "--include_source_info", "--include_imports", *protos],
        [*base, f"--grpc_python_out={out}", f"--mypy_grpc_out={out}", *services],
    ]
    for args in steps:
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed: {' '.join(args)}")
    (target / "__init__.py").write_text(INIT)
    (target / "py.typed").write_text("")
    shutil.rmtree(target / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "libs/common/src")
