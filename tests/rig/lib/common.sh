# shellcheck shell=bash disable=SC2034  # variables are used by the scripts sourcing this
# Shared helpers for the kflash USB test rig (sourced by tests/rig/run and friends).

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
REPO_ROOT=$(cd "$RIG_DIR/../.." && pwd -P)
RIG_CACHE=${KFLASH_RIG_CACHE:-$RIG_DIR/cache}

rig_log() { printf 'rig: %s\n' "$*" >&2; }
rig_die() {
    printf 'rig: error: %s\n' "$1" >&2
    shift
    local line
    for line in "$@"; do printf 'rig:   %s\n' "$line" >&2; done
    exit 125
}

# Run as root, or through sudo when available.
rig_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        rig_die "need root to run: $*" "run as root or install sudo"
    fi
}

# rig_need_pkgs PKG... : apt-get install the packages that are not installed yet.
rig_need_pkgs() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    rig_log "installing missing packages: ${missing[*]}"
    if ! rig_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
        rig_as_root apt-get update >&2 || true
        rig_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
            || rig_die "apt-get install ${missing[*]} failed"
    fi
}

# Seconds with one decimal from a microsecond count.
rig_us_to_s() { printf '%d.%01d' "$(($1 / 1000000))" "$((($1 % 1000000) / 100000))"; }
