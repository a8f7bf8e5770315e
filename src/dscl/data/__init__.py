"""Data layer: long-tailed datasets, the DSCL multi-view transform, class-balanced sampling, checks.

```python
from dscl.data import build_datasets, DSCLTransform
splits = build_datasets(cfg.data)            # Fashion-MNIST-LT by default; nothing is downloaded
train = splits.train.with_transform(DSCLTransform(cfg.data.image_size, cfg.views, splits.mean, splits.std))
```
"""

from dscl.data.checks import check_images, summarize_dataset
from dscl.data.core import DataError, LTDataset, long_tailed_counts
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
    "LTDataset",
    "build_datasets",
    "check_images",
    "long_tailed_counts",
    "summarize_dataset",
]
