"""The distill stage kind: ``spec`` (its stage model), ``operator`` (``run(ctx)``: KL on T-scaled
teacher logits, plus hard labels, into a student), ``_train`` (the loop), ``plan`` (its hooks)."""
