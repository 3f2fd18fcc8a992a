"""Infrastructure every layer may use: atomic artifacts and checksums, devices and logging, ranks, the code's import closure."""
