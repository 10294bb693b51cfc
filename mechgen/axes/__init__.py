"""Table side: one module per correspondence axis (functional, positional, developmental and
convergence, relational links, configurational similarity)."""
