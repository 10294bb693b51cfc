"""Table side: the per-head tables, their schema checks and files, and the per-seed summaries
(pandas, no torch)."""
