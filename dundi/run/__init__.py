"""A run directory and what is done with one: load/save with hashes (``directory``), train →
index → classify (``pipeline``), enrolment, image files, answers and the demo."""
