"""Run state on disk: checkpoints with their sidecars, and the resume and fork state of training runs."""
