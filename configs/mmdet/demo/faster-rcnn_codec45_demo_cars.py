# Faster R-CNN with the codec-45 backbone on the bundled aerial photo: 1
# photo, 5 car boxes (no masks). The cars are small (40 to 220 px wide in the
# 1024x682 photo), so images keep a 400 px short side. Each batch contains the
# photo twice, and random flips make the two copies differ half of the time.
# Trained from scratch for 80 iterations, then evaluated on the same photo
# (COCO bbox mAP). The shared settings are in _base_/cpu_demo.py.
_base_ = ["mmdet::_base_/models/faster-rcnn_r50_fpn.py", "./_base_/cpu_demo.py"]

data_root = "datasets/codec_demo/cars/"
classes = ("car",)
metainfo = dict(classes=classes)

model = dict(
    backbone=dict(_delete_=True, **_base_.codec_backbone),
    neck=dict(norm_cfg=_base_.norm_cfg),
    roi_head=dict(bbox_head=dict(num_classes=len(classes))),
    train_cfg=_base_.few_proposals,
)

# Faster R-CNN iterations cost less than Mask R-CNN ones, so this demo runs
# more of them; the schedule follows max_iters as in the shared settings.
max_iters = 80
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=20),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=max_iters, milestones=[int(0.8 * max_iters)], gamma=0.1),
]
default_hooks = dict(checkpoint=dict(interval=max_iters))

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(600, 400), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(600, 400), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]

train_dataloader = dict(
    batch_size=2,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline),
)
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(ann_file=data_root + "annotations.json", metric="bbox")
test_evaluator = val_evaluator
