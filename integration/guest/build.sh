#!/usr/bin/env bash
# Build the small real test guest: a Debian cloud kernel plus a busybox initramfs.
#
# Outputs (relative to the repo root, never committed):
#   build/guest/vmlinuz      the kernel of the current Debian 12 linux-image-*-cloud-amd64
#   build/guest/initrd.img   gzip'd newc cpio: busybox-static, the modules below, /init,
#                            /bin/memcheck (integration/guest/memcheck.c, gcc -static) and
#                            /bin/diskpat (integration/guest/diskpat.c, gcc -static)
#
# Why this shape: the integration tests need a guest that boots in seconds under TCG and has a
# real network stack and real disks. The cloud kernel is small and has virtio-net and
# virtio-blk as modules, so the initramfs carries just those modules (resolved from modules.dep,
# loaded in dependency order with insmod), and busybox provides every userland tool /init needs.
# Two programs are our own, statically linked so the initramfs needs no libc: memcheck, a memory
# workload that verifies its own patterns (guest.dirty=RATE), and diskpat, its counterpart for
# block devices (guest.diskload=vdX, and run by tests over the console).
#
# Fails loudly: a wanted module that is not in modules.dep, or memcheck or diskpat not
# compiling, ends the build with an error (and leaves the previous outputs in place).
#
# Idempotent: if both outputs exist and are newer than this script, the /init, memcheck.c,
# diskpat.c and busybox, nothing is done (no apt query either). GUEST_REBUILD=1 forces a
# rebuild, which also picks up a newer kernel package.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$ROOT/build/guest"
WORK="$OUT/work"
INIT_SRC="$HERE/init"
MEMCHECK_SRC="$HERE/memcheck.c"
DISKPAT_SRC="$HERE/diskpat.c"
BUSYBOX=/bin/busybox

# Modules wanted in the guest; their dependencies are added from modules.dep. A name matches
# its module file with '-' and '_' taken as equal (the kernel does the same): pvpanic_pci is
# pvpanic-pci.ko.
#   virtio_pci + virtio_net: the NICs; button + evdev: the ACPI power button as an input
#   device, so the guest powers off on QMP system_powerdown; pvpanic_pci: a guest kernel panic
#   reaches QEMU (and qsup) as GUEST_PANICKED; virtio_blk: the disks, /dev/vda, /dev/vdb, ...
WANT_MODULES=(virtio_pci virtio_net button evdev pvpanic_pci virtio_blk)

log() { printf 'guest-build: %s\n' "$*" >&2; }

up_to_date() {
    local out input
    for out in "$OUT/vmlinuz" "$OUT/initrd.img"; do
        [[ -s "$out" ]] || return 1
        for input in "${BASH_SOURCE[0]}" "$INIT_SRC" "$MEMCHECK_SRC" "$DISKPAT_SRC" "$BUSYBOX"; do
            [[ "$out" -nt "$input" ]] || return 1
        done
    done
}

ensure_tools() {
    local missing=()
    [[ -x "$BUSYBOX" ]] && "$BUSYBOX" --list >/dev/null 2>&1 \
        && file_is_static "$BUSYBOX" || missing+=(busybox-static)
    command -v cpio >/dev/null || missing+=(cpio)
    command -v depmod >/dev/null || missing+=(kmod)
    command -v gcc >/dev/null || missing+=(gcc)
    # gcc -static needs libc.a (libc6-dev); without it gcc prints the bare name back.
    [[ -f "$(gcc -print-file-name=libc.a 2>/dev/null)" ]] || missing+=(libc6-dev)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# busybox (non-static) would need libc in the initramfs; insist on busybox-static.
file_is_static() {
    # A static binary has no PT_INTERP; `ldd` says "not a dynamic executable".
    ! ldd "$1" >/dev/null 2>&1
}

kernel_package() {
    local pkg
    pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}')"
    if [[ -z "$pkg" ]]; then
        apt-get update -qq
        pkg="$(apt-cache depends linux-image-cloud-amd64 \
            | awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}')"
    fi
    [[ -n "$pkg" ]] || { log "cannot resolve linux-image-cloud-amd64"; exit 1; }
    printf '%s\n' "$pkg"
}

fetch_kernel() {
    local pkg="$1" deb
    mkdir -p "$WORK/deb"
    deb="$(ls "$WORK/deb/${pkg}_"*.deb 2>/dev/null | head -n1 || true)"
    if [[ -z "$deb" ]]; then
        log "downloading $pkg"
        rm -f "$WORK/deb/"*.deb  # an older kernel package is no longer wanted
        # apt's _apt user cannot write into root-owned dirs; download as root quietly.
        (cd "$WORK/deb" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
        deb="$(ls "$WORK/deb/${pkg}_"*.deb 2>/dev/null | head -n1 || true)"
        [[ -n "$deb" ]] || { log "apt-get download $pkg failed"; exit 1; }
    fi
    rm -rf "$WORK/kernel"
    dpkg -x "$deb" "$WORK/kernel"
}

# Print the modules (paths relative to /lib/modules/KVER) in load order: every module after
# all of its dependencies. modules.dep lists a module's deps so that the LAST must load first.
# Exits non-zero when a wanted module is not found. It runs in a subshell (command
# substitution), so its caller must check its status: see build_initrd.
module_order() {
    local kdir="$1" seen="" m
    declare -A dep
    local line key
    while IFS= read -r line; do
        key="${line%%:*}"
        dep["$key"]="${line#*:}"
    done <"$kdir/modules.dep"
    visit() {
        local path="$1" d deps=()
        [[ " $seen " == *" $path "* ]] && return 0
        read -r -a deps <<<"${dep[$path]}"
        local i
        for ((i = ${#deps[@]} - 1; i >= 0; i--)); do visit "${deps[i]}"; done
        seen+=" $path"
        printf '%s\n' "$path"
    }
    local path pattern
    for m in "${WANT_MODULES[@]}"; do
        pattern="${m//[-_]/[-_]}"  # pvpanic_pci -> pvpanic[-_]pci
        path="$(grep -E "(^|/)${pattern}\.ko(\.[a-z]+)?:" "$kdir/modules.dep" | head -n1 | cut -d: -f1 || true)"
        [[ -n "$path" ]] || { log "module $m not found in $kdir/modules.dep"; exit 1; }
        visit "$path"
    done
}

build_initrd() {
    local kver kdir rootfs order rel modules
    kver="$(ls "$WORK/kernel/lib/modules")"
    kdir="$WORK/kernel/lib/modules/$kver"
    depmod -b "$WORK/kernel" "$kver"

    rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,lib/modules}
    cp "$BUSYBOX" "$rootfs/bin/busybox"
    local applet
    for applet in $("$BUSYBOX" --list-full); do
        [[ "$applet" == bin/busybox ]] && continue
        mkdir -p "$rootfs/$(dirname "$applet")"
        ln -sf /bin/busybox "$rootfs/$applet"
    done

    # The order first, its status checked: a failure inside `done < <(module_order ...)` would
    # be lost (a process substitution's exit status is never looked at).
    modules="$(module_order "$kdir")" || { log "cannot resolve the wanted modules: giving up"; exit 1; }
    [[ -n "$modules" ]] || { log "no modules resolved: giving up"; exit 1; }
    order="$rootfs/lib/modules/load-order"
    : >"$order"
    while IFS= read -r rel; do
        cp "$kdir/$rel" "$rootfs/lib/modules/"
        basename "$rel" >>"$order"
    done <<<"$modules"
    log "modules: $(tr '\n' ' ' <"$order")"

    gcc -static -O2 -s -Wall -Wextra -o "$WORK/memcheck" "$MEMCHECK_SRC" \
        || { log "gcc failed on $MEMCHECK_SRC: giving up"; exit 1; }
    install -m 0755 "$WORK/memcheck" "$rootfs/bin/memcheck"
    gcc -static -O2 -s -Wall -Wextra -o "$WORK/diskpat" "$DISKPAT_SRC" \
        || { log "gcc failed on $DISKPAT_SRC: giving up"; exit 1; }
    install -m 0755 "$WORK/diskpat" "$rootfs/bin/diskpat"

    install -m 0755 "$INIT_SRC" "$rootfs/init"
    # Console device node, for the rare case devtmpfs is mounted late.
    mknod -m 600 "$rootfs/dev/console" c 5 1 2>/dev/null || true

    (cd "$rootfs" && find . -print0 | LC_ALL=C sort -z \
        | cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9 >"$OUT/initrd.img.tmp"
    mv -f "$OUT/initrd.img.tmp" "$OUT/initrd.img"
    cp "$WORK/kernel/boot/vmlinuz-$kver" "$OUT/vmlinuz.tmp"
    mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
    printf '%s\n' "$kver" >"$OUT/kernel-version"
    touch "$OUT/initrd.img" "$OUT/vmlinuz"
}

main() {
    mkdir -p "$OUT"
    if [[ "${GUEST_REBUILD:-0}" != 1 ]] && up_to_date; then
        log "up to date: $OUT"
        return 0
    fi
    ensure_tools
    local pkg
    pkg="$(kernel_package)"
    fetch_kernel "$pkg"
    build_initrd
    log "built $OUT/vmlinuz ($(stat -c %s "$OUT/vmlinuz") bytes)," \
        "$OUT/initrd.img ($(stat -c %s "$OUT/initrd.img") bytes), kernel $(cat "$OUT/kernel-version")"
}

main "$@"
