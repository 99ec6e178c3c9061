# Mask R-CNN R50-FPN with the codec-45 CoDeC backbone (about 45% fewer
# ResNet-50 MACs) on COCO-2017, with MMDetection 3.3.0's 1x schedule
# (12 epochs, 16 images per batch over 8 GPUs).
#
# Inputs follow torchvision's conventions, as in MMDetection's R50 config:
# RGB, ImageNet mean and std, and the stride of a bottleneck in its 3x3 conv
# (style="pytorch"), because CoDeC backbones are compressed from torchvision's
# ResNet-50.
#
# The backbone weights come from tools/compress_backbone.py (after ImageNet
# fine-tuning): pass `--backbone-weights DIR` to tools/mmdet_train.py, which
# sets model.backbone.weights=DIR and takes the spec from DIR/spec.json.
# Without weights the backbone starts from random factors. This schedule
# freezes the stem and first stage and keeps BatchNorm in eval mode, so it
# does not suit training from scratch: configs/mmdet/demo/ shows settings
# that do.
_base_ = "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"

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
