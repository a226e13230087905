"""A digit classifier that judges class-conditional samples of the built-in dataset ("class accuracy").

A falling diffusion loss says little about whether a model draws digits (NOTES.md); this judge does. It is
an RBF support-vector classifier (scikit-learn `SVC`, C=10, gamma="scale") fitted on the *training* split's
real MNIST digits at the size the model was trained at (16x16 or 32x32 grayscale, pixels / 255); on the
held-out split it reads ~96% of real digits correctly, so a sample set scoring >= 90% is made of digits
a reader recognises as the class they were asked for. Chance is 10%.

    judge = DigitClassifier.fit_builtin(image_size=16)
    judge.accuracy(images_uint8_nhwc, requested_labels)  -> float in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _features(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 (N, S, S), (N, S, S, 1) or (N, S, S, 3) -> float64 (N, S*S) gray pixels in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images.astype(np.float64).mean(axis=3)  # RGB written by the sampler: three equal channels
    if images.ndim != 3 or images.shape[1:] != (image_size, image_size):
        raise ValueError(
            f"digit classifier: expected images of shape (N, {image_size}, {image_size}[, C]), got {images.shape}"
        )
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


@dataclass
class DigitClassifier:
    """An SVC over raw pixels of `image_size` x `image_size` digits (see the module docstring)."""

    model: object
    image_size: int

    @classmethod
    def fit_builtin(cls, image_size: int = 16, heldout_per_class: int = 50) -> DigitClassifier:
        """Fit on the built-in training split (the digits not held out); ~0.3 s at 16x16, ~1.3 s at 32x32."""
        from sklearn.svm import SVC

        from dtr_scale.data.builtin import mnist_images, split_indices

        images, labels = mnist_images(image_size)
        train, _ = split_indices(labels, heldout_per_class)
        model = SVC(C=10.0, gamma="scale").fit(_features(images[train], image_size), labels[train])
        return cls(model=model, image_size=image_size)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, S, S[, C]) -> predicted digit int64 (N,)."""
        return np.asarray(self.model.predict(_features(images, self.image_size)), dtype=np.int64)

    def accuracy(self, images: np.ndarray, labels: np.ndarray | list[int]) -> float:
        """Share of `images` read as their `labels` (the class each sample was asked to be)."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(images) or len(labels) == 0:
            raise ValueError(
                f"digit classifier: got {len(images)} images and {len(labels)} labels (need equal, non-zero)"
            )
        return float((self.predict(images) == labels).mean())

    def per_class_accuracy(self, images: np.ndarray, labels: np.ndarray | list[int]) -> dict[int, float]:
        """{class: share of that class's samples read as it} for every class present in `labels`."""
        labels = np.asarray(labels, dtype=np.int64)
        hits = self.predict(images) == labels
        return {int(c): float(hits[labels == c].mean()) for c in np.unique(labels)}
