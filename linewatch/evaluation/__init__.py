"""Scoring a model against labelled images: AUROC, PRO, F1, false-reject rate."""
