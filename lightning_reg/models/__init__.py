"""Backbones: net(x, t, y) with attributes num_classes and data_shape; label num_classes is null."""
