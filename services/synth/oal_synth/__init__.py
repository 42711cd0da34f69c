"""The outlier-synthesis service: REST API, RQ workers, boundary sampling and latent diffusion."""
