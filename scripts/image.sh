#!/usr/bin/env bash
# Builds the container image localhost/flagstream:<version> with buildah from
# the top-level Containerfile (see its header for the design), optionally
# exporting it as an OCI archive.
#
#   scripts/image.sh                      # build (and the release binaries if needed)
#   scripts/image.sh --oci-archive out.tar  # and write an OCI archive
#   IMAGE_SKIP_CARGO=1 scripts/image.sh   # use target/release as it is
#   IMAGE_PROFILE=debug scripts/image.sh  # the debug binaries (tests only)
#
# Needs buildah (Debian package `buildah`); runs with vfs storage and chroot
# isolation, so it works as root without a daemon, overlay or user
# namespaces, and never pulls (the base is `scratch`). Prints the image id.
set -euo pipefail
cd "$(dirname "$0")/.."

archive=""
while [ $# -gt 0 ]; do
  case "$1" in
    --oci-archive) archive="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "image.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

command -v buildah >/dev/null || { echo "image.sh: buildah not found (apt-get install buildah)" >&2; exit 1; }

version=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["workspace"]["package"]["version"])')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
source_url=${IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo unknown)}
# The commit time, so a rebuild of the same commit gives the same image.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
image="localhost/flagstream:$version"
buildah=(buildah --storage-driver vfs)

profile=${IMAGE_PROFILE:-release}
case "$profile" in
  release) cargo_profile=(--release) ;;
  debug) cargo_profile=() ;;
  *) echo "image.sh: IMAGE_PROFILE is release or debug" >&2; exit 2 ;;
esac
if [ -z "${IMAGE_SKIP_CARGO:-}" ]; then
  cargo build "${cargo_profile[@]}" --locked -p flagwrite -p flagread
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp"
chmod 1777 "$root/tmp"
for bin in flagwrite flagread; do
  # Debug line tables stay in target/; the image gets the code and symbols.
  objcopy --strip-debug "target/$profile/$bin" "$root/usr/local/bin/$bin"
  chmod 0755 "$root/usr/local/bin/$bin"
done
# The shared libraries and the loader, each at the path the binaries name
# (copied through symlinks).
libs=$(for bin in flagwrite flagread; do
  ldd "target/$profile/$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u)
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
  chmod 0755 "$root$lib"
done
cat > "$root/etc/nsswitch.conf" <<'NSS'
passwd: files
group: files
hosts: files dns
NSS
cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
chmod 0644 "$root"/etc/nsswitch.conf "$root"/etc/passwd "$root"/etc/group "$root"/etc/ssl/certs/* 2>/dev/null || true
chown -R 0:0 "$root"
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

previous=$("${buildah[@]}" images --no-trunc --format '{{.ID}}' "$image" 2>/dev/null | head -1 || true)
"${buildah[@]}" build --quiet --isolation chroot --pull=never --layers=false --format oci \
  --timestamp "$SOURCE_DATE_EPOCH" \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  --build-arg SOURCE="$source_url" --build-arg CREATED="$created" \
  -f "$PWD/Containerfile" -t "$image" "$stage" >/dev/null
id=$("${buildah[@]}" images --no-trunc --format '{{.ID}}' "$image" | head -1)
size=$("${buildah[@]}" images --format '{{.Size}}' "$image" | head -1)
echo "image.sh: $image $id ($size)" >&2
# The image this tag named before, now untagged, is dropped so rebuilds do
# not pile up in the storage.
if [ -n "$previous" ] && [ "$previous" != "$id" ]; then
  "${buildah[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi
if [ -n "$archive" ]; then
  rm -f "$archive"
  "${buildah[@]}" push --quiet "$image" "oci-archive:$archive:$image"
  echo "image.sh: wrote $archive" >&2
fi
echo "$id"
