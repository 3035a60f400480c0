#!/usr/bin/env bash
# Build llama.cpp's command-line tools llama-quantize, llama-imatrix and llama-perplexity (CPU, Release) from the
# llama.cpp that the installed llama-cpp-python vendors, so that the tools read exactly the files its Python
# bindings write and quantize as they do. (The wheel ships only the shared libraries, not the tools; llama-quantize
# is needed to quantize with an importance-matrix file.) About 6 minutes on 2 cores.
#
#   benchmarks/build_llama_cpp.sh     # builds once into ${AUTOCOMPRESS_CACHE:-~/.cache/autocompress}/llama.cpp
#
# Environment:
#   PYTHON                   the interpreter whose llama-cpp-python version is matched (default: .venv/bin/python
#                            when present, else python3)
#   LLAMA_CPP_PYTHON_VERSION the sdist version to build (default: the installed llama-cpp-python's, else the newest)
#   LLAMA_CPP_SDIST          a llama_cpp_python-*.tar.gz already downloaded (default: pip download from PyPI)
# It builds for AVX2, not natively, as the README's install does (a native build's AMX kernels crash on VMs that
# do not enable AMX tile state). Running it again is a no-op once the three tools of that version are built; the
# tools land in .../llama.cpp/bin and the build's version and llama.cpp commit in .../llama.cpp/BUILD_INFO.
set -euo pipefail

CACHE="${AUTOCOMPRESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/autocompress}"  # autocompress.models.cache_dir()
DEST="$CACHE/llama.cpp"
TOOLS=(llama-quantize llama-imatrix llama-perplexity)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"
if [[ -z "$VERSION" && -n "${LLAMA_CPP_SDIST:-}" ]]; then
    VERSION="$(basename "$LLAMA_CPP_SDIST" .tar.gz)"
    VERSION="${VERSION#llama_cpp_python-}"
fi
if [[ -z "$VERSION" ]]; then
    VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)"
fi

built() {
    [[ -f "$DEST/BUILD_INFO" ]] || return 1
    [[ -z "$VERSION" ]] || grep -qx "llama-cpp-python $VERSION" "$DEST/BUILD_INFO" || return 1
    for tool in "${TOOLS[@]}"; do [[ -x "$DEST/bin/$tool" ]] || return 1; done
}

if built; then
    echo "llama.cpp tools already built in $DEST/bin:"
    cat "$DEST/BUILD_INFO"
    exit 0
fi

mkdir -p "$DEST"
WORK="$(mktemp -d "$DEST/.build-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

SDIST="${LLAMA_CPP_SDIST:-}"
if [[ -z "$SDIST" ]]; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python${VERSION:+==$VERSION}" -d "$WORK"
    SDIST="$(ls "$WORK"/llama_cpp_python-*.tar.gz)"
fi
tar -xzf "$SDIST" -C "$WORK"
SOURCE="$(ls -d "$WORK"/llama_cpp_python-*/)"
VERSION="$(basename "$SOURCE")"
VERSION="${VERSION#llama_cpp_python-}"
LLAMA="$SOURCE/vendor/llama.cpp"

# The sdist vendors llama.cpp with a one-commit .git: its commit is exact, its commit count (llama.cpp's build
# number) is not, so the commit is what identifies the build.
COMMIT="$(git -C "$LLAMA" rev-parse HEAD 2>/dev/null \
    || sed -n 's/.*update llama.cpp to ggml-org\/llama.cpp@\([0-9a-f]*\).*/\1/p' "$SOURCE/CHANGELOG.md" | head -n 1)"

GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
cmake -S "$LLAMA" -B "$WORK/build" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF >"$WORK/configure.log"
cmake --build "$WORK/build" --config Release --target "${TOOLS[@]}" -j "$(nproc 2>/dev/null || echo 2)" >"$WORK/build.log"

mkdir -p "$DEST/bin"
for tool in "${TOOLS[@]}"; do
    install -m 0755 "$WORK/build/bin/$tool" "$DEST/bin/$tool"
done
{
    echo "llama-cpp-python $VERSION"
    echo "llama.cpp commit $COMMIT"
    "$DEST/bin/llama-perplexity" --version 2>&1 | grep -E '^(version|built with)' || true
} >"$DEST/BUILD_INFO"
echo "built ${TOOLS[*]} into $DEST/bin:"
cat "$DEST/BUILD_INFO"
