#!/usr/bin/env bash
# Builds localhost/biomero-test-converter:latest without any registry: a root filesystem of a
# static busybox plus rootfs/convert, packed with tar and loaded with `podman import`.
# Idempotent: the image carries a hash of its inputs and is rebuilt only when they change.
#
# Needs: podman, busybox-static (/bin/busybox) and, on the project's machines, CONTAINERS_CONF
# pointing at config/podman/containers.conf.
set -euo pipefail

IMAGE="${1:-localhost/biomero-test-converter:latest}"
HERE="$(cd "$(dirname "$0")" && pwd)"
BUSYBOX="${BUSYBOX:-/bin/busybox}"
PODMAN="${PODMAN:-podman}"

if ! file_type="$(head -c 4 "$BUSYBOX" 2>/dev/null | od -An -c | tr -d ' ')" \
    || [ "$file_type" != "177ELF" ]; then
    echo "no busybox binary at $BUSYBOX (apt-get install busybox-static)" >&2
    exit 1
fi

recipe="$(cat "$BUSYBOX" "$HERE/rootfs/convert" "$HERE/build.sh" | sha256sum | cut -c1-16)"
current="$("$PODMAN" image inspect --format '{{ index .Config.Labels "biomero.recipe" }}' \
    "$IMAGE" 2>/dev/null || true)"
if [ "$current" = "$recipe" ]; then
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs/bin" "$work/rootfs/tmp" "$work/rootfs/etc"
cp "$BUSYBOX" "$work/rootfs/bin/busybox"
for applet in $("$work/rootfs/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$work/rootfs/bin/$applet"
done
cp "$HERE/rootfs/convert" "$work/rootfs/convert"
chmod 755 "$work/rootfs/convert"
chmod 1777 "$work/rootfs/tmp"
echo "root:x:0:0:root:/:/bin/sh" > "$work/rootfs/etc/passwd"
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .

"$PODMAN" import --quiet \
    --change 'ENTRYPOINT ["/bin/sh", "/convert"]' \
    --change "LABEL biomero.recipe=$recipe" \
    --change 'ENV PATH=/bin' \
    "$work/rootfs.tar" "$IMAGE" >/dev/null
