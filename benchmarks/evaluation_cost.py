"""Cost of one image evaluation: ``build_image_evaluator`` + ``set_real`` (the reference pass) + one call on a
``samples.npz``, in wall-clock and process CPU seconds, with the metric values (to compare code versions: run
it with ``PYTHONPATH`` pointing at each checkout).

    python benchmarks/evaluation_cost.py --samples samples.npz [--reference digits:mnist]
        [--feature_network checkpoints/classifier/mnist16.ckpt] [--metrics fid is kid accuracy]
        [--reference_cache DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lightning_reg.metrics.evaluate import build_image_evaluator, load_reference, read_samples


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="uint8 NHWC images under arr_0 or samples, and labels")
    parser.add_argument("--reference", default="digits:mnist")
    parser.add_argument("--feature_network", default="checkpoints/classifier/mnist16.ckpt")
    parser.add_argument("--metrics", nargs="+", default=["fid", "is", "kid", "accuracy"])
    parser.add_argument("--reference_cache", default=None, help="a folder of cached reference features")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    samples, labels = read_samples(args.samples)
    shape = (samples.shape[3], samples.shape[1], samples.shape[2])
    reference = load_reference(args.reference, shape)
    cache = {"reference_cache": args.reference_cache} if args.reference_cache else {}
    start = (time.perf_counter(), time.process_time())
    evaluator = build_image_evaluator(args.metrics, shape, args.feature_network, **cache)
    evaluator.set_real(reference)
    ready = (time.perf_counter(), time.process_time())
    row = evaluator(samples, labels)
    end = (time.perf_counter(), time.process_time())
    print(json.dumps({"setup_wall_s": ready[0] - start[0], "setup_cpu_s": ready[1] - start[1],
                      "evaluate_wall_s": end[0] - ready[0], "evaluate_cpu_s": end[1] - ready[1],
                      "total_cpu_s": end[1] - start[1], **row}))


if __name__ == "__main__":
    main()
