"""Model side: the scoring job and the per-checkpoint scores it computes under torch (attention
metrics, relational and configurational passes)."""
