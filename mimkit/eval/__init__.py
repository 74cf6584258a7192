from mimkit.eval.features import extract_features
from mimkit.eval.knn import knn_evaluate, knn_predict, topk_accuracy
from mimkit.eval.linprobe import linear_probe

__all__ = ["extract_features", "knn_evaluate", "knn_predict", "topk_accuracy", "linear_probe"]
