"""Generators: the embedded latent diffusion model, Stable Diffusion, and tiny-random."""
