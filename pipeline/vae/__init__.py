"""The image autoencoder of latent diffusion (SD-VAE, pixel-space identity, tiny random) behind one
wrapper with the project's image and latent conventions (`autoencoder`)."""
