"""Test helpers that need real infrastructure (a local SLURM cluster)."""

from evfsam_lightning.testing.slurm_cluster import LocalSlurmCluster, SlurmClusterError

__all__ = ["LocalSlurmCluster", "SlurmClusterError"]
