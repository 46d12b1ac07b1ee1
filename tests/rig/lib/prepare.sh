# shellcheck shell=bash
# Guest preparation for the kflash USB test rig. Sourced after lib/common.sh.
#
#   rig_prepare   -> sets RIG_KVER, RIG_KERNEL (vmlinuz), RIG_INITRD, RIG_MODDIR
#
# Everything is cached under $RIG_CACHE (tests/rig/cache, gitignored):
#   kernel/<ver>/            Debian's linux-image-<ver> unpacked with dpkg -x (+ depmod)
#   kernel/<ver>/vmlinux     the uncompressed kernel (ELF with a PVH entry note): QEMU boots it
#                            directly, which skips ~3 s of in-guest XZ decompression under TCG
#   initramfs-<ver>.cpio.gz  busybox initramfs (loads virtio/9p/overlay, switch_roots)
#   current                  the kernel version in use
# Nothing is installed into /boot. When the cache is complete no network access happens.
# Delete tests/rig/cache to pick up a newer Debian kernel.

# Modules the initramfs loads (dependencies are resolved from modules.dep).
RIG_INITRAMFS_MODULES=(virtio_pci virtio_console 9pnet_virtio 9p overlay)

rig_host_deps() {
    local pkgs=()
    command -v qemu-system-x86_64 >/dev/null 2>&1 || pkgs+=(qemu-system-x86)
    command -v cpio >/dev/null 2>&1 || pkgs+=(cpio)
    command -v depmod >/dev/null 2>&1 || pkgs+=(kmod)
    [ -x /lib/systemd/systemd-udevd ] || pkgs+=(udev)
    { [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || pkgs+=(busybox-static)
    command -v flock >/dev/null 2>&1 || pkgs+=(util-linux)
    command -v gzip >/dev/null 2>&1 || pkgs+=(gzip)
    command -v xz >/dev/null 2>&1 || pkgs+=(xz-utils)
    command -v dfu-util >/dev/null 2>&1 || pkgs+=(dfu-util)   # the ROM DFU scenarios (tests/rig_dfu.rs)
    [ "${#pkgs[@]}" -eq 0 ] || rig_need_pkgs "${pkgs[@]}"
}

# Print the versioned kernel package name (e.g. linux-image-6.1.0-56-amd64).
rig_resolve_kernel_pkg() {
    if [ -n "${KFLASH_RIG_KERNEL_PKG:-}" ]; then
        printf '%s\n' "$KFLASH_RIG_KERNEL_PKG"
        return
    fi
    local dep
    dep=$(apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
    if [ -z "$dep" ]; then
        rig_as_root apt-get update >&2 || true
        dep=$(apt-cache depends linux-image-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
    fi
    [ -n "$dep" ] || rig_die "cannot resolve Debian's linux-image-*-amd64 package" \
        "check 'apt-cache depends linux-image-amd64' (apt sources / apt-get update)" \
        "or set KFLASH_RIG_KERNEL_PKG=linux-image-<ver>-amd64"
    printf '%s\n' "$dep"
}

rig_fetch_kernel() {
    local pkg=$1 ver=${1#linux-image-} dir tmp deb
    dir=$RIG_CACHE/kernel/$ver
    [ -f "$dir/.done" ] && return 0
    rig_log "fetching guest kernel $pkg (one time, cached in ${RIG_CACHE#"$REPO_ROOT"/})"
    tmp=$(mktemp -d "$RIG_CACHE/.dl.XXXXXX")
    # apt-get download drops privileges to _apt; a world-writable dir avoids the warning.
    chmod 0777 "$tmp"
    (cd "$tmp" && apt-get download "$pkg" >&2) || {
        rm -rf "$tmp"
        rig_die "apt-get download $pkg failed" "check network access to the Debian mirror"
    }
    deb=$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n1)
    rm -rf "$dir"
    mkdir -p "$dir"
    dpkg -x "$deb" "$dir"
    rm -rf "$tmp"
    { [ -f "$dir/boot/vmlinuz-$ver" ] && [ -d "$dir/lib/modules/$ver" ]; } ||
        rig_die "unexpected layout in $pkg (no boot/vmlinuz-$ver or lib/modules/$ver)"
    depmod -b "$dir" "$ver"
    rig_extract_vmlinux "$dir/boot/vmlinuz-$ver" "$dir/vmlinux"
    : >"$dir/.done"
}

# The bzImage carries the kernel as an XZ stream; QEMU can boot the ELF inside directly
# through its PVH entry point. On any problem, leave no vmlinux (then the bzImage is used).
rig_extract_vmlinux() {
    local bz=$1 out=$2 off
    rm -f "$out"
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bz" | head -n1 | cut -d: -f1) || true
    [ -n "$off" ] || return 0
    # (xz stops after the stream: read through a process substitution, so that tail's
    # SIGPIPE does not fail the pipeline under pipefail)
    if xz -dc --single-stream < <(tail -c +"$((off + 1))" "$bz" 2>/dev/null) >"$out.tmp" 2>/dev/null &&
        [ "$(head -c4 "$out.tmp" | od -An -c | tr -d ' ')" = '177ELF' ]; then
        mv "$out.tmp" "$out"
    else
        rm -f "$out.tmp"
    fi
}

# Echo the .ko files (absolute paths) needed for RIG_INITRAMFS_MODULES, in load order.
rig_initramfs_kos() {
    local root=$1 ver=$2 m line deps seen=" "
    for m in "${RIG_INITRAMFS_MODULES[@]}"; do
        deps=$(modprobe -d "$root" -S "$ver" --show-depends "$m") ||
            rig_die "module $m not found in the guest kernel $ver"
        while read -r line; do
            case $line in
            insmod\ *)
                line=${line#insmod }
                line=${line%% *}
                case $seen in *" $line "*) continue ;; esac
                seen+="$line "
                printf '%s\n' "$line"
                ;;
            builtin\ *) ;;
            *) rig_die "modprobe --show-depends $m: unexpected line: $line" ;;
            esac
        done <<<"$deps"
    done
}

rig_build_initramfs() {
    local ver=$1 root=$RIG_CACHE/kernel/$1 out=$RIG_CACHE/initramfs-$1.cpio.gz
    local stamp want tmp ko kos
    want=$(cat "$RIG_DIR/guest/initramfs-init" "$RIG_DIR/lib/prepare.sh" /bin/busybox | sha256sum | cut -c1-16)
    stamp=$RIG_CACHE/initramfs-$ver.stamp
    if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    rig_log "building initramfs for $ver"
    tmp=$(mktemp -d "$RIG_CACHE/.initramfs.XXXXXX")
    mkdir -p "$tmp"/{bin,dev,proc,sys,newroot,lower,rw,modules}
    cp /bin/busybox "$tmp/bin/busybox"
    ln -s busybox "$tmp/bin/sh"
    install -m 0755 "$RIG_DIR/guest/initramfs-init" "$tmp/init"
    kos=$(rig_initramfs_kos "$root" "$ver") || exit $?
    while read -r ko; do
        cp "$ko" "$tmp/modules/"
        basename "$ko" >>"$tmp/modules/order"
    done <<<"$kos"
    (cd "$tmp" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -1 >"$out.tmp"
    mv "$out.tmp" "$out"
    printf '%s\n' "$want" >"$stamp"
    rm -rf "$tmp"
}

rig_prepare() {
    mkdir -p "$RIG_CACHE"
    rig_host_deps
    local lock ver pkg
    exec {lock}>"$RIG_CACHE/.lock"
    flock "$lock"
    ver=$(cat "$RIG_CACHE/current" 2>/dev/null || true)
    if [ -z "$ver" ] || [ ! -f "$RIG_CACHE/kernel/$ver/.done" ] ||
        { [ -n "${KFLASH_RIG_KERNEL_PKG:-}" ] && [ "linux-image-$ver" != "$KFLASH_RIG_KERNEL_PKG" ]; }; then
        pkg=$(rig_resolve_kernel_pkg)
        rig_fetch_kernel "$pkg"
        ver=${pkg#linux-image-}
        printf '%s\n' "$ver" >"$RIG_CACHE/current"
    fi
    rig_build_initramfs "$ver"
    flock -u "$lock"
    exec {lock}>&-
    RIG_KVER=$ver
    RIG_KERNEL=$RIG_CACHE/kernel/$ver/vmlinux
    [ -f "$RIG_KERNEL" ] || RIG_KERNEL=$RIG_CACHE/kernel/$ver/boot/vmlinuz-$ver
    RIG_INITRD=$RIG_CACHE/initramfs-$ver.cpio.gz
    RIG_MODDIR=$RIG_CACHE/kernel/$ver/lib/modules/$ver
    export RIG_KVER RIG_KERNEL RIG_INITRD RIG_MODDIR
}
