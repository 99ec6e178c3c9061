"""Datasets for codec-det's demos and tests.

- :mod:`codec_det.data.demo_fetch`: downloads the real demo photos
  (labelme, sahi and imgaug examples) and converts them to COCO format.
- :mod:`codec_det.data.demo_datasets`: registers them as the Detectron2
  datasets ``codec_demo_voc``, ``codec_demo_cars`` and ``codec_demo_quokka``.
- :mod:`codec_det.data.synthetic_coco`: generates a larger synthetic
  COCO-format dataset of coloured shapes and stick figures with keypoints.

Importing these modules does not import Detectron2; only the registration
functions do.
"""
