"""The prune stage kind: ``spec`` (its stage model), ``operator`` (``run(ctx)``: structured pruning
of MLP width, GQA-consistent heads and depth by activation importance), ``plan`` (its hooks)."""
