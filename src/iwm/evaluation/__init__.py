"""iwm.evaluation: feature extraction, probes, world-model MRR."""
