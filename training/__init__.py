"""Training and evaluation of segmentation_models_pytorch models over the loaders."""
