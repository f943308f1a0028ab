"""Moved to distill.student.embed_classifier; this name stays importable for published SERVING.md files of earlier
runs (``from distill.students.embed_classifier import EmbedClassifier``)."""

from distill.student.embed_classifier import EmbedClassifier, FieldHead, encoder_folder, fit_heads  # noqa: F401
