"""Making galaxies from a trained model: codes (prior, fitted sampler), decoding, residual detail.

``Generator.load(model_dir)`` is the one entry point; ``fit_sampler`` writes the sampler it uses.
"""
