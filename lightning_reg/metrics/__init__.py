"""Evaluation: exact toy metrics, FID/IS/KID through torchmetrics, and figures."""

from lightning_reg.metrics.images import IMAGE_METRICS, ImageMetrics, image_metrics
from lightning_reg.metrics.plots import image_grid, save_figure, scatter_figure
from lightning_reg.metrics.toy import (TOY_METRICS, energy_distance, mean_log_likelihood, on_shape_fraction,
                                       sliced_wasserstein, toy_metric_names, toy_metrics)

__all__ = ["IMAGE_METRICS", "ImageMetrics", "image_metrics", "image_grid", "save_figure", "scatter_figure",
           "TOY_METRICS", "energy_distance", "mean_log_likelihood", "on_shape_fraction", "sliced_wasserstein",
           "toy_metric_names", "toy_metrics"]
