"""Tokenizers, text/JSONL -> indexed datasets, blended GPT datasets, calibration sampling."""
