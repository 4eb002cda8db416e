"""Regenerate the Python stubs from proto/: `python -m clients.protocol.generate`.

protoc writes `from tpcluster.v1 import inference_pb2`; the stubs live in clients.protocol, so
that import is rewritten to a package-relative one. `--check` compares instead of writing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
SOURCE = "tpcluster/v1/inference.proto"
OUTPUTS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def render() -> dict[str, str]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main([
            "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}", str(PROTO_ROOT / SOURCE),
        ])
        if code != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT / SOURCE} (exit {code})")
        out = Path(tmp) / "tpcluster" / "v1"
        return {
            name: (out / name).read_text().replace("from tpcluster.v1 import inference_pb2", "from . import inference_pb2")
            for name in OUTPUTS
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs differ")
    args = parser.parse_args(argv)
    rendered = render()
    stale = [name for name, text in rendered.items() if not (HERE / name).is_file() or (HERE / name).read_text() != text]
    if args.check:
        if stale:
            print(f"stale stubs: {stale}; run python -m clients.protocol.generate", file=sys.stderr)
        return 1 if stale else 0
    for name, text in rendered.items():
        (HERE / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
