"""dreamfleet's model work in one process: base models, DreamBooth training, generation. No Ray in here."""
