"""Low rank: each dense weight factored into two thin ones (adaptive-rank SVD and its data-driven forms)."""
