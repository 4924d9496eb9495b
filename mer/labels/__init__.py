"""Label refinement and semi-supervised pseudo-labelling."""
