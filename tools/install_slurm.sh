#!/usr/bin/env bash
# Install a local SLURM (slurm-wlm + munge) for the tests marked `slurm`. Idempotent; needs root
# on Debian/Ubuntu. Does nothing when slurmctld and munged are already on PATH.
exec bash "$(dirname "$0")/apt_install.sh" install_slurm.sh "slurmctld munged" "slurm-wlm munge" "slurmctld -V"
