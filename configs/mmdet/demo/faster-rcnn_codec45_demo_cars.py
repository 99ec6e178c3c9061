# Faster R-CNN with the codec-45 backbone on the bundled aerial photo: 1
# photo, 5 car boxes (no masks). The cars are small (40 to 220 px wide in the
# 1024x682 photo), so images keep a 400 px short side. Each batch contains the
# photo twice, and random flips make the two copies differ half of the time.
# Trained from scratch for 80 iterations on the CPU, then evaluated on the
# same photo (COCO bbox mAP).
#
# With no pretrained weights, every normalisation layer learns (GN in the
# ResNet and the FPN) and no stage is frozen. Images are small and proposals
# few, so that an iteration takes seconds on a 2-core CPU; data loading stays
# in the main process. The schedule counts iterations: a 20-iteration linear
# warm-up, a 0.1 step at 80% of max_iters, gradient norms clipped at 10.
# The data come from `python -m codec_det.data.demo_fetch` into
# datasets/codec_demo/: run from the repository root, or pass --data-root.
_base_ = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"

norm_cfg = dict(type="GN", num_groups=32, requires_grad=True)
max_iters = 80

data_root = "datasets/codec_demo/cars/"
classes = ("car",)
metainfo = dict(classes=classes)

custom_imports = dict(imports=["codec_det.mmdet"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type="CoDeCResNet",
        spec="codec-45",
        weights=None,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_cfg=norm_cfg,
        norm_eval=False,
        style="pytorch",
    ),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(num_classes=len(classes))),
    train_cfg=dict(
        rpn_proposal=dict(max_per_img=256),
        rcnn=dict(sampler=dict(num=128)),
    ),
)

train_cfg = dict(_delete_=True, type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.02, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=10.0, norm_type=2),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=20),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=max_iters, milestones=[int(0.8 * max_iters)], gamma=0.1),
]

default_hooks = dict(
    logger=dict(type="LoggerHook", interval=4),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    visualization=dict(type="DetVisualizationHook", draw=False),
)
log_processor = dict(type="LogProcessor", window_size=4, by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend="gloo"))
randomness = dict(seed=0)

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
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    batch_sampler=None,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file="annotations.json",
        data_prefix=dict(img=""),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file="annotations.json",
        data_prefix=dict(img=""),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader

val_evaluator = dict(type="CocoMetric", ann_file=data_root + "annotations.json", metric="bbox")
test_evaluator = val_evaluator
