#!/usr/bin/env bash
# Install a local SLURM (slurm-wlm + munge) for the tests marked `slurm`. Idempotent; needs root
# on Debian/Ubuntu. Does nothing when slurmctld is already on PATH.
set -u

if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh: needs root (apt-get install slurm-wlm munge)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm.sh: apt-get not found; install slurm-wlm and munge by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
packages="slurm-wlm munge"

# Refresh the package lists only when apt does not know the packages yet (fresh CI images).
if ! apt-cache show slurm-wlm >/dev/null 2>&1 || ! apt-cache show munge >/dev/null 2>&1; then
    apt-get update -qq || { echo "install_slurm.sh: apt-get update failed" >&2; exit 1; }
fi

# shellcheck disable=SC2086
if ! apt-get install -y -qq --no-install-recommends $packages >/dev/null; then
    echo "install_slurm.sh: 'apt-get install $packages' failed" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null 2>&1; then
    echo "install_slurm.sh: installed $packages but slurmctld is still not on PATH" >&2
    exit 1
fi
echo "install_slurm.sh: installed $packages ($(slurmctld -V))"
