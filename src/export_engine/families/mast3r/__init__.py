"""MASt3R: what is specific to this model family."""
