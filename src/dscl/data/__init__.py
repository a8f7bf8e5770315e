"""Data layer: long-tailed datasets, the DSCL multi-view transform, class-balanced sampling, checks.

```python
from dscl.data import build_datasets, DSCLTransform
splits = build_datasets(cfg.data)            # Fashion-MNIST-LT by default; nothing is downloaded
train = splits.train.with_transform(DSCLTransform(cfg.data.image_size, cfg.views, splits.mean, splits.std))
```
"""

from dscl.data.checks import (
    FileProblem,
    check_files_before_training,
    check_images,
    find_bad_files,
    summarize_dataset,
)
from dscl.data.core import DataError, LTDataset, decode_image, long_tailed_counts, read_image_file
from dscl.data.datasets import DatasetSplits, build_datasets
from dscl.data.samplers import ClassBalancedSampler
from dscl.data.views import ClassifierTransform, DSCLTransform, DSCLViews, EvalTransform

__all__ = [
    "ClassBalancedSampler",
    "ClassifierTransform",
    "DSCLTransform",
    "DSCLViews",
    "DataError",
    "DatasetSplits",
    "EvalTransform",
    "FileProblem",
    "LTDataset",
    "build_datasets",
    "check_files_before_training",
    "check_images",
    "decode_image",
    "find_bad_files",
    "long_tailed_counts",
    "read_image_file",
    "summarize_dataset",
]
