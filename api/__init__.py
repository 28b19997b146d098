"""The Flask API (never imports TensorFlow)."""
