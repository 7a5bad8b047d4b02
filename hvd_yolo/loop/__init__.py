"""The training loop, read top down: ``plan`` (the arithmetic) -> ``run`` (what a run is made
of) -> ``resume`` -> ``step`` (one optimizer step) -> ``epoch`` -> ``save``; the two drivers
``fixed`` and ``elastic`` (neither imports the other: ``commands/train.py`` picks one);
``events``, the callback seam for observers. Importing it starts and registers nothing."""
