from mimkit.data.dataset import ImageDataset, collate, synthetic_batch
from mimkit.data.decode import BadImage, load_array, load_image, load_rgb, to_rgb
from mimkit.data.sources import IMAGE_EXTENSIONS, DataError, ImageList, find_images, labelled_splits
from mimkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, compute_mean_std, eval_transform, pretrain_transform

__all__ = [
    "ImageDataset",
    "collate",
    "synthetic_batch",
    "BadImage",
    "load_array",
    "load_image",
    "load_rgb",
    "to_rgb",
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageList",
    "find_images",
    "labelled_splits",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "compute_mean_std",
    "eval_transform",
    "pretrain_transform",
]
