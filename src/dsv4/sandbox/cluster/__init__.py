"""Placement of sandboxes: one host (`local`) or the nodes of a Ray cluster (`ray_backend`, optional extra)."""
