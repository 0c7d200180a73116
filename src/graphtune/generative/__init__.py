"""GPD: generated parameters for a new city (node-level collection, parameter dataset, diffusion, denoisers, sampling)."""
