"""Local validation of a model on labelled DICOM: metrics, the evaluation run, reports, model checks.

``metrics`` is pure numpy (confusion matrices, bootstrap intervals, ROC); ``dataset`` finds the cases
and their labels; ``run`` analyses each case through ``node.runner.analyse``; ``report`` writes the
HTML and JSON; ``check`` runs a phantom through each model (``pacs-node models check``).
"""
