"""FastSAM3D: what is specific to this model family."""
