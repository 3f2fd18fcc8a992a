"""Reporting: flags and their decoding, tables, headline rows, figures; from metrics files' contents, no heavy compute."""
