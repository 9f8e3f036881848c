"""Inference: die maps in, per-die pattern labels out (the code every scorer runs).

- :mod:`.runtime`: device, threads and bf16 choices, the argmax over classes;
- :mod:`.fastpath`: a faster copy of a network for inference (channels-last, sub-pixel upsamplers);
- :mod:`.packed`: maps as one flat buffer (the Parquet column's layout), size-bucketed batches, the
  forward passes;
- :mod:`.products`: the predictions table the nightly flow and ``wafer-fcn predict`` write.

Most callers use :class:`fcn_core.scorer.Scorer`, which puts these together.
"""
