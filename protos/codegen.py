"""Regenerates the Python code for the public API: `python -m protos.codegen`.

protoc runs with protos/ as its include root, so the descriptors are registered under the names
clients see in reflection ("tandem/v1/generation.proto"). protoc then emits top-level imports
(`from tandem.v1 import ...`); they are rewritten to `from protos.tandem.v1 import ...` because
`tandem` is not an importable package of its own.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("tandem/v1/generation.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_TOP_LEVEL_IMPORT = re.compile(r"^(from|import) tandem\.", re.MULTILINE)


def generated_paths(proto: str) -> list[str]:
    """Paths, relative to the output root, of the files generated for one .proto file."""
    stem = proto.removesuffix(".proto")
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def generate(out_root: Path) -> list[Path]:
    """Generates the code for every proto under out_root (laid out like protos/); returns the
    files written."""
    from grpc_tools import protoc  # build-time dependency only (test extras)

    well_known = str(resources.files("grpc_tools") / "_proto")
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for proto in PROTO_FILES:
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO_ROOT / proto),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}; see its message above")
            for rel in generated_paths(proto):
                text = (Path(tmp) / rel).read_text()
                dest = out_root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(_TOP_LEVEL_IMPORT.sub(r"\1 protos.tandem.", text))
                written.append(dest)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT,
                        help="output root (default: protos/, next to the .proto files)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    # protoc leaves no package markers; without them `protos.tandem.v1` does not import.
    for pkg in ("tandem", "tandem/v1"):
        init = args.out / pkg / "__init__.py"
        if not init.exists():
            init.write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
