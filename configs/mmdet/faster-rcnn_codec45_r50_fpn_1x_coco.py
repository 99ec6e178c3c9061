# Faster R-CNN R50-FPN with the codec-45 CoDeC backbone (about 45% fewer
# ResNet-50 MACs) on COCO-2017, with MMDetection 3.3.0's 1x schedule
# (12 epochs, 16 images per batch over 8 GPUs).
#
# Inputs, weights and the backbone settings are as in
# mask-rcnn_codec45_r50_fpn_1x_coco.py: pass `--backbone-weights DIR` (a
# tools/compress_backbone.py output folder) to tools/mmdet_train.py.
_base_ = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"

custom_imports = dict(imports=["codec_det.mmdet"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type="CoDeCResNet",
        spec="codec-45",
        weights=None,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=True,
        style="pytorch",
    )
)
