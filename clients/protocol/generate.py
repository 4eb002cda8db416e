"""Regenerate the Python stubs from proto/: `python -m clients.protocol.generate`.

Two sources: tpcluster.v1 (`tpcluster/v1/inference.proto` -> `inference_pb2*`) and the Open
Inference Protocol (`inference/grpc_predict_v2.proto` -> `grpc_predict_v2_pb2*`). protoc writes
imports such as `from tpcluster.v1 import inference_pb2`; the stubs live in clients.protocol, so
those imports are rewritten to package-relative ones. `--check` compares instead of writing: the
generated code, not the generator's version banners (`GRPC_GENERATED_VERSION`, the protobuf
runtime version check), which name whichever grpcio-tools made them and change with every patch
release. Those banners are lower bounds the stubs put on the runtime (grpcio, protobuf), so the
committed ones stay until the code itself changes.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
# proto source (relative to proto/) -> the module name protoc gives its stubs
SOURCES = {"tpcluster/v1/inference.proto": "inference", "inference/grpc_predict_v2.proto": "grpc_predict_v2"}


# The lines that carry the generator's version rather than the generated code.
_VERSION_BANNERS = (
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M),
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"(_runtime_version\.ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
)


def without_versions(text: str) -> str:
    """`text` with the generator's version banners blanked, for comparing generated code."""
    for banner in _VERSION_BANNERS:
        text = banner.sub(lambda m: m.group(1) if m.groups() else "", text)
    return text


def _outputs(stem: str) -> tuple[str, ...]:
    return (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


OUTPUTS = tuple(name for stem in SOURCES.values() for name in _outputs(stem))


def render() -> dict[str, str]:
    """File name in clients/protocol -> its generated text."""
    from grpc_tools import protoc

    rendered = {}
    for source, stem in SOURCES.items():
        with tempfile.TemporaryDirectory() as tmp:
            code = protoc.main([
                "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", str(PROTO_ROOT / source),
            ])
            if code != 0:
                raise SystemExit(f"protoc failed on {PROTO_ROOT / source} (exit {code})")
            package = Path(source).parent
            absolute = f"from {'.'.join(package.parts)} import {stem}_pb2"
            for name in _outputs(stem):
                text = (Path(tmp) / package / name).read_text()
                rendered[name] = text.replace(absolute, f"from . import {stem}_pb2")
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs differ")
    args = parser.parse_args(argv)
    rendered = render()
    stale = [name for name, text in rendered.items()
             if not (HERE / name).is_file() or without_versions((HERE / name).read_text()) != without_versions(text)]
    if args.check:
        if stale:
            print(f"stale stubs: {stale}; run python -m clients.protocol.generate", file=sys.stderr)
        return 1 if stale else 0
    for name, text in rendered.items():
        if name in stale:  # an unchanged stub keeps its banners (the runtime versions it was made for)
            (HERE / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
