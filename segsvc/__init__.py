"""segsvc: an inference backend for image segmentation."""

__version__ = "0.1.0"
