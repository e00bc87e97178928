#!/usr/bin/env bash
# Sets up aarch64 cross-compilation and user-mode emulation for edgec's TVM backend (make setup-aarch64).
#
# Installs the Debian cross toolchain (aarch64-linux-gnu-g++) and qemu-user, then builds a sysroot that
# qemu-aarch64 runs an aarch64 Python in: Debian's arm64 python3.X and the shared libraries it needs,
# numpy and apache-tvm-ffi from their aarch64 wheels, and libtvm_runtime.so from the aarch64 apache-tvm
# wheel (the Relax VM; the 240 MB compiler library is not needed to run a module). Versions follow the
# host venv's, so what TVM builds here loads there.
#
# The sysroot goes to $EDGEC_CACHE_DIR/aarch64-sysroot (default ~/.cache/edgec/aarch64-sysroot), where
# edgec.backends.tvm.emulate looks for it. arm64 packages come through a private apt state beside the
# sysroot: the machine's dpkg gets no foreign architecture and nothing arm64 is installed system-wide.
# Run as root on Debian; a second run only checks and exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
SYSROOT="${EDGEC_CACHE_DIR:-$HOME/.cache/edgec}/aarch64-sysroot"
MANIFEST="$SYSROOT/edgec-sysroot.json"
DISTS=(apache-tvm apache-tvm-ffi numpy typing_extensions)

log() { echo "setup-aarch64: $*"; }

host_version() {  # the host venv's version of a distribution, which the sysroot must match
    "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

install_host_tools() {
    if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then
        return
    fi
    log "installing the cross toolchain and qemu-user"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        g++-aarch64-linux-gnu qemu-user >/dev/null
}

# `arm64_apt apt-get|apt-cache ARGS...`: apt restricted to this machine's Debian sources, with arm64 as
# its only architecture and its state kept beside the sysroot.
arm64_apt() {
    local state="$SYSROOT.apt"
    if [ ! -f "$state/apt.conf" ]; then
        mkdir -p "$state/lists/partial" "$state/archives/partial" "$state/sources.list.d"
        touch "$state/status" "$state/sources.list"
        [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$state/sources.list"
        local debian=/etc/apt/sources.list.d/debian.sources
        [ -f "$debian" ] && cp "$debian" "$state/sources.list.d/"
        cat >"$state/apt.conf" <<EOF
Dir::State "$state";
Dir::State::status "$state/status";
Dir::Cache "$state";
Dir::Etc::SourceList "$state/sources.list";
Dir::Etc::SourceParts "$state/sources.list.d";
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Sandbox::User "root";
EOF
    fi
    local tool="$1"
    shift
    "$tool" -c "$state/apt.conf" "$@"
}

# Python, its standard library and the shared libraries they (and TVM's runtime) load: the dependency
# closure of the interpreter, less the tools (perl, dpkg, tar) that packaging scripts would use.
python_packages() {
    arm64_apt apt-cache -q=2 depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$1-minimal" "lib$1-stdlib" libstdc++6 \
        | grep -E '^(lib|gcc-[0-9]+-base|zlib1g|python3)' | grep -v '^libperl' | sort -u
}

# `manifest check VERSIONS...` succeeds when the sysroot records these versions; `manifest write PYTHON
# VERSIONS...` records them with the interpreter and runtime paths that edgec reads.
manifest() {
    "$PYTHON" - "$MANIFEST" "$@" <<'PY'
import json, pathlib, sys
path, mode, *rest = sys.argv[1:]
keys = ("apache-tvm", "apache-tvm-ffi", "numpy", "typing_extensions")
if mode == "check":
    try:
        have = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        sys.exit(1)
    sys.exit(0 if all(have.get(k) == v for k, v in zip(keys, rest)) else 1)
python, *versions = rest
record = {"python": f"usr/bin/{python}", "tvm_runtime": "usr/local/lib/tvm/libtvm_runtime.so",
          **dict(zip(keys, versions))}
pathlib.Path(path).write_text(json.dumps(record, indent=1) + "\n")
PY
}

# Copies libtvm_runtime.so out of the apache-tvm wheel in $1 into the folder $2.
extract_runtime() {
    "$PYTHON" - "$1" "$2" <<'PY'
import pathlib, shutil, sys, zipfile
wheel, = pathlib.Path(sys.argv[1]).glob("apache_tvm-*.whl")
with zipfile.ZipFile(wheel) as z, z.open("tvm/lib/libtvm_runtime.so") as src:
    with open(pathlib.Path(sys.argv[2]) / "libtvm_runtime.so", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
}

build_sysroot() {  # arguments: the versions of DISTS
    local work="$SYSROOT.work" python
    rm -rf "$work"
    mkdir -p "$work/debs" "$work/wheels" "$work/root/usr/local/lib/tvm"
    arm64_apt apt-get -qq update
    # The interpreter Debian ships for arm64, e.g. python3.11: the wheels below are chosen for it.
    python="$(arm64_apt apt-cache -q=2 depends python3-minimal | grep -oE 'python3\.[0-9]+-minimal' | head -1)"
    python="${python%-minimal}"
    log "building $SYSROOT ($python, apache-tvm $1, apache-tvm-ffi $2, numpy $3)"

    # shellcheck disable=SC2046  # one package name per word
    (cd "$work/debs" && arm64_apt apt-get -qq download $(python_packages "$python"))
    for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done

    local pip=("$PYTHON" -m pip -q --disable-pip-version-check)
    local aarch64_wheels=(--no-deps --only-binary=:all: --implementation cp
        --platform manylinux_2_28_aarch64 --python-version "${python#python}")
    "${pip[@]}" install "${aarch64_wheels[@]}" --target "$work/root/usr/local/lib/$python/dist-packages" \
        "apache-tvm-ffi==$2" "numpy==$3" "typing_extensions==$4"
    "${pip[@]}" download "${aarch64_wheels[@]}" -d "$work/wheels" "apache-tvm==$1"
    extract_runtime "$work/wheels" "$work/root/usr/local/lib/tvm"

    # Prove it runs before it replaces a working sysroot.
    qemu-aarch64 -L "$work/root" "$work/root/usr/bin/$python" -c \
        "import ctypes, sys, numpy, tvm_ffi; ctypes.CDLL(sys.argv[1], ctypes.RTLD_GLOBAL)" \
        "$work/root/usr/local/lib/tvm/libtvm_runtime.so"
    rm -rf "$SYSROOT"
    mv "$work/root" "$SYSROOT"
    rm -rf "$work"
    manifest write "$python" "$@"
}

main() {
    if ! host_version apache-tvm >/dev/null 2>&1; then
        echo "setup-aarch64: $PYTHON has no apache-tvm: run make setup, then pip install -e '.[tvm]'" \
            "(or point PYTHON at a Python that has it)" >&2
        exit 1
    fi
    install_host_tools
    local versions=() dist
    for dist in "${DISTS[@]}"; do versions+=("$(host_version "$dist")"); done
    if manifest check "${versions[@]}"; then
        log "up to date: $SYSROOT"
        return
    fi
    mkdir -p "$(dirname "$SYSROOT")"
    build_sysroot "${versions[@]}"
    log "done: $SYSROOT ($(du -sh "$SYSROOT" | cut -f1))"
}

main "$@"
