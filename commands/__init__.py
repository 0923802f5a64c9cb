"""The work of evaluate.py, export.py and preview.py: commands that use a trained model or a data set but do not
train. Apart from training/ so that package holds the training run alone; these build on it, never the reverse."""
