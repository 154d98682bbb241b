"""Where sandboxes run: one host (`local`) or the nodes of a Ray cluster (`ray_backend`, optional extra)."""
