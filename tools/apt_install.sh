#!/usr/bin/env bash
# Install Debian/Ubuntu packages for a test dependency, once: the shared body of install_slurm.sh and
# install_browser.sh. Idempotent; needs root and apt-get. Does nothing when every command is on PATH.
#   bash tools/apt_install.sh NAME "COMMANDS" "PACKAGES" "VERSION COMMAND"
set -u
name=$1 commands=$2 packages=$3 version=$4

on_path() {
    for c in $commands; do command -v "$c" >/dev/null 2>&1 || return 1; done
}

on_path && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "$name: needs root (apt-get install $packages)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$name: apt-get not found; install $packages by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when apt does not know the packages yet (fresh CI images).
for p in $packages; do
    if ! apt-cache show "$p" >/dev/null 2>&1; then
        apt-get update -qq || { echo "$name: apt-get update failed" >&2; exit 1; }
        break
    fi
done

# shellcheck disable=SC2086
if ! apt-get install -y -qq --no-install-recommends $packages >/dev/null; then
    echo "$name: 'apt-get install $packages' failed" >&2
    exit 1
fi

if ! on_path; then
    echo "$name: installed $packages but one of $commands is still not on PATH" >&2
    exit 1
fi
echo "$name: installed $packages ($($version))"
