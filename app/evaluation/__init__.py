"""The selection-quality harness: datasets, the protocol, metrics and reports."""
