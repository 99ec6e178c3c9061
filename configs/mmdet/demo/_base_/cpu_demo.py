# Settings shared by the CPU demos: an R-CNN with the codec-45 backbone,
# trained from scratch on bundled photos and evaluated on the same photos
# (COCO mAP). Each demo adds its model, data folder, classes, pipelines and
# batch size.
#
# With no pretrained weights, every normalisation layer learns (GN in the
# ResNet and the FPN) and no stage is frozen. Proposals and sampled RoIs are
# few, so that an iteration takes seconds on a 2-core CPU, and data loading
# stays in the main process. The schedule counts iterations: a 20-iteration
# linear warm-up, a 0.1 step at 80% of max_iters, gradient norms clipped at
# 10. A demo that changes max_iters sets train_cfg, param_scheduler and the
# checkpoint interval again, because they are computed here.
# The data come from `python -m codec_det.data.demo_fetch` into
# datasets/codec_demo/: run from the repository root, or pass --data-root.
_base_ = "mmdet::_base_/default_runtime.py"

custom_imports = dict(imports=["codec_det.mmdet"], allow_failed_imports=False)

norm_cfg = dict(type="GN", num_groups=32, requires_grad=True)
codec_backbone = dict(
    type="CoDeCResNet",
    spec="codec-45",
    weights=None,
    out_indices=(0, 1, 2, 3),
    frozen_stages=-1,
    norm_cfg=norm_cfg,
    norm_eval=False,
    style="pytorch",
)
# Replaces the two-stage detector's train_cfg entries that size the heads' work.
few_proposals = dict(
    rpn_proposal=dict(max_per_img=256),
    rcnn=dict(sampler=dict(num=64)),
)

max_iters = 64
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
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
auto_scale_lr = dict(enable=False, base_batch_size=16)

default_hooks = dict(
    logger=dict(type="LoggerHook", interval=4),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    visualization=dict(type="DetVisualizationHook", draw=False),
)
log_processor = dict(type="LogProcessor", window_size=4, by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend="gloo"))
randomness = dict(seed=0)

dataset_type = "CocoDataset"
backend_args = None
train_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    batch_sampler=None,
    dataset=dict(
        type=dataset_type,
        ann_file="annotations.json",
        data_prefix=dict(img=""),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        backend_args=backend_args,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        ann_file="annotations.json",
        data_prefix=dict(img=""),
        test_mode=True,
        backend_args=backend_args,
    ),
)
test_dataloader = val_dataloader

val_evaluator = dict(type="CocoMetric", format_only=False, backend_args=backend_args)
test_evaluator = val_evaluator
