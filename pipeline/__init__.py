"""repa-pipeline's library: data sources and stores, VAE and teacher wrappers, models, alignment
objectives, samplers, metrics and launchers. No CLI code and no file-layout policy live here."""
