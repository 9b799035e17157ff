"""Ray Serve: the HTTP endpoints for generator and denoiser models."""
