#!/usr/bin/env bash
# Build BVLC Caffe (tools + pycaffe for the given Python) from the pinned source into a cache directory outside the
# repository, keyed by source version, build options and Python/numpy versions, so a second run is a no-op.
# Usage: build-caffe.sh PYTHON      Env: CAFFE_CUDA=1 builds with CUDA; CAFFETUNE_CACHE overrides the cache root.
# Prints the install prefix on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/caffe-source.lock"
python=${1:?usage: build-caffe.sh PYTHON}
cache_root=${CAFFETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/caffetune}
variant=cpu; [ "${CAFFE_CUDA:-0}" = 1 ] && variant=cuda
pyver=$("$python" -c 'import sys, numpy; print(f"py{sys.version_info[0]}{sys.version_info[1]}-np{numpy.__version__}")')
key="caffe-$CAFFE_DEB_VERSION-$variant-$pyver"
prefix="$cache_root/$key"

if [ -f "$prefix/install/.complete" ]; then echo "$prefix/install"; exit 0; fi
# One build at a time per cache (two checkouts on one machine may run `make setup` together).
mkdir -p "$cache_root"
exec 9>"$cache_root/.build.lock"
flock 9
if [ -f "$prefix/install/.complete" ]; then echo "$prefix/install"; exit 0; fi

"$here/fetch-caffe.sh" "$cache_root/source-$CAFFE_DEB_VERSION"
src="$cache_root/source-$CAFFE_DEB_VERSION/src"

cpu_only=ON; [ "$variant" = cuda ] && cpu_only=OFF
py_include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
py_library=$("$python" -c 'import sysconfig, os; print(os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")))')
np_include=$("$python" -c 'import numpy; print(numpy.get_include())')

mkdir -p "$prefix/build"
cmake -S "$src" -B "$prefix/build" -DCMAKE_BUILD_TYPE=Release \
  -DCPU_ONLY=$cpu_only -DBLAS=Open -DBUILD_python=ON -Dpython_version=3 -DBUILD_docs=OFF \
  -DUSE_LEVELDB=ON -DUSE_LMDB=ON -DUSE_OPENCV=ON \
  -DPYTHON_EXECUTABLE="$python" -DPYTHON_INCLUDE_DIR="$py_include" -DPYTHON_LIBRARY="$py_library" \
  -DNUMPY_INCLUDE_DIR="$np_include" -DCMAKE_INSTALL_PREFIX="$prefix/install" \
  -DCMAKE_INSTALL_RPATH="$prefix/install/lib" -DCMAKE_BUILD_WITH_INSTALL_RPATH=OFF >"$prefix/cmake.log" 2>&1 \
  || { cat "$prefix/cmake.log" >&2; exit 1; }
cmake --build "$prefix/build" -j"$(nproc)" >"$prefix/build.log" 2>&1 || { cat "$prefix/build.log" >&2; exit 1; }
cmake --install "$prefix/build" >>"$prefix/build.log"
touch "$prefix/install/.complete"
echo "$prefix/install"
