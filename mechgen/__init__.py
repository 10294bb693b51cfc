"""mechgen: does a mechanism found in one language model hold in others?

Scores every attention head of every checkpoint of Pythia/PolyPythias-style runs and measures how
the 1-back (previous-token) mechanism corresponds across seeds and sizes.
"""

__version__ = "0.1.0"
