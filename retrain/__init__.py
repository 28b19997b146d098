"""Training, evaluation and the retraining loop (imports TensorFlow)."""
