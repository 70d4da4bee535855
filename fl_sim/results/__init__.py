"""Scoring against the truth and everything written to disk: metrics, summaries, galleries, plots."""
