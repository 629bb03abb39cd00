"""Pure image measures: arrays in, numbers out, no orchestration.

- :mod:`erasure.measures.ssim`     SSIM of image pairs, the paper's 25x25 window scaled to the image side
- :mod:`erasure.measures.fid`      the TF-FID InceptionV3 (sha1-checked) and FID/KID by torchmetrics
- :mod:`erasure.measures.clip`     CLIPScore / 100 by torchmetrics on a local CLIP
- :mod:`erasure.measures.nudenet`  NudeNet detections and flagged counts

Evaluation's metrics (:mod:`eval.metrics`) and the toy world's probe and quality check call these, so a number
means the same wherever it is computed.
"""
