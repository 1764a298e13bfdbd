"""Evaluation: exact toy metrics, FID/IS/KID through torchmetrics, and figures."""

from lightning_reg.metrics.images import IMAGE_METRICS, image_metrics
from lightning_reg.metrics.plots import image_grid, save_figure, scatter_figure
from lightning_reg.metrics.toy import (energy_distance, mean_log_likelihood, on_shape_fraction, sliced_wasserstein,
                                       toy_metrics)

__all__ = ["IMAGE_METRICS", "image_metrics", "image_grid", "save_figure", "scatter_figure", "energy_distance",
           "mean_log_likelihood", "on_shape_fraction", "sliced_wasserstein", "toy_metrics"]
