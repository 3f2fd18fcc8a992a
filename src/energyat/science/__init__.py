"""The science: data, models, attacks, training methods, energies and DER, the training loop, PCA starts, SGLD sampling."""
