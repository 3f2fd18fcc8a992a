"""Evaluation: robust accuracy (PGD, APGD, AutoAttack), energies of natural vs adversarial images, statistics, IS/FID."""
