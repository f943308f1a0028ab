"""Old home of the embedding classifier, kept because published SERVING.md files of earlier runs import
``distill.students.embed_classifier``; the code lives in distill.student.embed_classifier."""
