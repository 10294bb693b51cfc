"""Table side: the figures of a suite, of the mechanisms, of the seeds and of a combined study
(matplotlib)."""
