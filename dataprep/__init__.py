"""Raw Cityscapes tree -> trainId masks and the Zarr cache; stats, verify, synthetic data."""
