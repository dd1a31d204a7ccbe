"""export-engine: validated inference engines for MASt3R and FastSAM3D."""

__version__ = "0.1.0"
