"""Data modules: the paper toy distributions and HF-datasets image data."""
