"""Per-rank worker processes and rank 0's coordinator."""
