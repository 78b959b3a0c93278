"""Theory of the squeezing effect in fixed-feature softmax regression, in pure JAX.

``dynamics.sam`` holds the (logits-)SAM transform that ``lm`` imports; the rest is the
simulator of paper §3 and Appendix A.
"""
