# faster-rcnn_codec45_r50_fpn_1x_coco.py with the codec-66 backbone (about 66%
# fewer ResNet-50 MACs).
_base_ = "./faster-rcnn_codec45_r50_fpn_1x_coco.py"

model = dict(backbone=dict(spec="codec-66"))
