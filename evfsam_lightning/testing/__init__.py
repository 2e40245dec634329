"""Seeded random full-size weights in the released file formats (`python -m evfsam_lightning.testing.fullsize`),
for smoke tests and benchmarks without downloads. The local SLURM test cluster lives in tests/slurm/cluster.py."""
