"""Table side: the statistics of the axes and the analyses across mechanisms, seeds and model
families."""
