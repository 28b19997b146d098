"""Model code. `imaging` is Pillow only (the API uses it); `preprocess` is NumPy/Pillow; `unet` and
the Keras runtime import TensorFlow."""

IMAGE_SIZE = 128
NUM_CLASSES = 3
CLASS_NAMES = ("pet", "background", "border")
