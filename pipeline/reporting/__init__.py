"""What the report stage builds on: the comparison of the students (scores, controls, paired differences), the
training-health verdicts, the plots, the model cards and the HTML page (templates/)."""
