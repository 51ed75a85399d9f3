"""Feature, manifest and dataset code for Mel-HuBERT."""
