"""Studies over many runs: seeds pooled from DVC experiments, the CO study, the paper's GPU-window blocks, presets."""
