"""Dense prediction with L²ViT: backbone adapter, torchvision Mask R-CNN / RetinaNet, UperNet, data, metrics, drawing.

``l2vit det train|eval`` and ``l2vit seg train|eval`` are built on this package; see ``docs/dense.md``.
"""
from .ade import ADE20K_CLASSES, palette
from .backbone import L2ViTBackbone, backbone_state_dict, read_weights
from .coco import CocoDetection, collate_detection, load_coco
from .config import DetConfig, SegConfig, dense_config_from_dict, dense_config_to_dict, load_dense_config
from .det_transforms import RandomSizeCrop, detection_eval_transforms, detection_train_transforms
from .detection import L2ViTFPN, LastLevelP6P7OnInput, build_detector, build_mask_rcnn, build_retinanet
from .draw import draw_detections, draw_segmentation, save_png
from .metrics import coco_evaluate, confusion_matrix, detections_to_coco, segmentation_metrics
from .schedule import LrSchedule
from .seg_data import SegEvalTransform, SegFolderDataset, SegTrainTransform
from .upernet import FCNHead, UPerHead, UperNet, build_upernet, slide_inference, whole_inference

__all__ = [
    'L2ViTBackbone', 'read_weights', 'backbone_state_dict',
    'L2ViTFPN', 'LastLevelP6P7OnInput', 'build_mask_rcnn', 'build_retinanet', 'build_detector',
    'UperNet', 'UPerHead', 'FCNHead', 'build_upernet', 'slide_inference', 'whole_inference',
    'CocoDetection', 'collate_detection', 'load_coco', 'RandomSizeCrop', 'detection_train_transforms',
    'detection_eval_transforms', 'SegFolderDataset', 'SegTrainTransform', 'SegEvalTransform',
    'coco_evaluate', 'detections_to_coco', 'confusion_matrix', 'segmentation_metrics',
    'draw_detections', 'draw_segmentation', 'save_png', 'palette', 'ADE20K_CLASSES',
    'DetConfig', 'SegConfig', 'load_dense_config', 'dense_config_from_dict', 'dense_config_to_dict', 'LrSchedule',
]
