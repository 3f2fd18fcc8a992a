"""Commands that are not dvc.yaml stages: aggregate, bench, block, preset."""
