"""ray-galaxy: a galaxy-image VAE trained with Ray Train, tuned with Ray Tune, served with Ray Serve."""

__version__ = "0.1.0"
