"""evfsam_lightning: the training framework for EVF-SAM (text-prompted Segment Anything)."""

__version__ = "0.1.0"
