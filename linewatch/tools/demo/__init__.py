"""`make demo`: a station calibrated and streamed end to end on real, freely available data."""
