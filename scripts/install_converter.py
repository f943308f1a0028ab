"""Install llama.cpp's HF -> GGUF converter next to the virtual environment.

The llama-cpp-python wheel ships the runtime but not ``convert_hf_to_gguf.py``; its sdist vendors the whole
llama.cpp tree. We take the converter, its ``conversion`` package and the matching ``gguf-py`` from the sdist of the
same version, so converter and runtime always agree on the GGUF format.

    python scripts/install_converter.py --version 0.3.36
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="llama-cpp-python version whose sdist to use")
    parser.add_argument("--dest", default=str(Path(sys.prefix) / "share" / "distill" / "llama_cpp_convert"))
    args = parser.parse_args()
    dest = Path(args.dest)
    marker = dest / ".version"
    if marker.exists() and marker.read_text().strip() == args.version:
        print(f"converter {args.version} already installed in {dest}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "-d", tmp, f"llama-cpp-python=={args.version}"],
            check=True,
        )
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        staging = Path(tmp) / "staging"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/vendor/llama.cpp/", 1)
                if len(parts) != 2 or not any(parts[1].startswith(w) for w in WANTED):
                    continue
                if not (member.isfile() or member.isdir()):
                    continue
                member.name = parts[1]
                tar.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").exists():
            raise SystemExit(f"convert_hf_to_gguf.py not found in {sdist.name}")
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    marker.write_text(args.version)
    print(f"installed llama.cpp converter {args.version} into {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
