"""vidrd-rt: an inference runtime for VidRD (Reuse and Diffuse) text-to-video models."""

__version__ = "0.1.0"
