"""Challenge submission export: predictions of a converted benchmark -> the files a leaderboard takes.

``challenges.py`` says what each challenge expects (names, labels, packaging), ``validation.py``
checks a prediction folder against the test images before anything is written, and ``export.py``
writes the submission atomically.
"""
from samunet.errors import SamunetError


class SubmissionError(SamunetError, ValueError):
    """Predictions that cannot be submitted as they are (missing, extra, misnamed, wrong grid or labels)."""
