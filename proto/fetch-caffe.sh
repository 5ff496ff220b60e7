#!/usr/bin/env bash
# Fetch the pinned Caffe source with apt through a private sources list and state directory (the system's apt
# configuration is never touched), verify its checksums, unpack it and apply Debian's patch series plus the one
# fix Debian 12's protobuf needs. Usage: fetch-caffe.sh DEST_DIR   (DEST_DIR/src is the patched tree)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=caffe-source.lock
source "$here/caffe-source.lock"
dest=${1:?usage: fetch-caffe.sh DEST_DIR}
[ -f "$dest/src/.caffetune-patched" ] && exit 0

work="$dest/apt"
mkdir -p "$work/etc" "$work/state/lists/partial" "$work/cache/archives/partial" "$work/download"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $CAFFE_SUITE main" \
  >"$work/etc/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State=$work/state" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1
          -o APT::Sandbox::User=root -qq)

verify() { echo "$CAFFE_ORIG_SHA256  $CAFFE_ORIG
$CAFFE_DEBIAN_SHA256  $CAFFE_DEBIAN" | (cd "$work/download" && sha256sum --quiet -c -); }

if ! verify >/dev/null 2>&1; then
  apt-get "${apt_opts[@]}" update
  (cd "$work/download" && apt-get "${apt_opts[@]}" source --download-only "$CAFFE_PACKAGE=$CAFFE_DEB_VERSION")
  verify || { echo "fetch-caffe: checksum mismatch for the Caffe source; refusing to build it" >&2; exit 1; }
fi

rm -rf "$dest/src.tmp" && mkdir -p "$dest/src.tmp"
tar -xzf "$work/download/$CAFFE_ORIG" -C "$dest/src.tmp"
tar -xJf "$work/download/$CAFFE_DEBIAN" -C "$dest/src.tmp"
while read -r patch; do
  case "$patch" in ''|'#'*) continue ;; esac
  patch -d "$dest/src.tmp" -p1 --quiet <"$dest/src.tmp/debian/patches/$patch"
done <"$dest/src.tmp/debian/patches/series"
# protobuf >= 3.21 dropped the two-argument CodedInputStream::SetTotalBytesLimit (the warning threshold).
sed -i 's/SetTotalBytesLimit(kProtoReadBytesLimit, 536870912)/SetTotalBytesLimit(kProtoReadBytesLimit)/' \
  "$dest/src.tmp/src/caffe/util/io.cpp"
grep -q 'SetTotalBytesLimit(kProtoReadBytesLimit)' "$dest/src.tmp/src/caffe/util/io.cpp"
touch "$dest/src.tmp/.caffetune-patched"
rm -rf "$dest/src" && mv "$dest/src.tmp" "$dest/src"
