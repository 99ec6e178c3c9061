# Mask R-CNN with the codec-45 backbone on the bundled VOC photos: 3 photos,
# 12 instances with polygons, 20 VOC classes of which 6 are annotated.
# Trained from scratch for 64 iterations of 3 images at a 256 px short side,
# then evaluated on the same photos (COCO bbox and segm mAP). The shared
# settings are in _base_/cpu_demo.py.
_base_ = ["mmdet::_base_/models/mask-rcnn_r50_fpn.py", "./_base_/cpu_demo.py"]

data_root = "datasets/codec_demo/voc/"
# In category-id order, as in annotations.json.
classes = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv/monitor",
)
metainfo = dict(classes=classes)

model = dict(
    backbone=dict(_delete_=True, **_base_.codec_backbone),
    neck=dict(norm_cfg=_base_.norm_cfg),
    roi_head=dict(
        bbox_head=dict(num_classes=len(classes)),
        mask_head=dict(num_classes=len(classes)),
    ),
    train_cfg=_base_.few_proposals,
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="Resize", scale=(416, 256), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(416, 256), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]

train_dataloader = dict(
    batch_size=3,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline),
)
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(ann_file=data_root + "annotations.json", metric=["bbox", "segm"])
test_evaluator = val_evaluator
