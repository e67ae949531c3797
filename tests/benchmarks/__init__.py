"""Side-by-side benchmarks, run on purpose (not part of the pytest suite); see README.md here."""
