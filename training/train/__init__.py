"""`train`: one finished config, the parts built from it, the loop, and what a run writes beside it."""
