"""What is written to disk: label tables and colours, one PNG saver through a temporary file, exports and overlays on top of it."""
