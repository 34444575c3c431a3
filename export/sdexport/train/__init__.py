"""`sdexport train-change`: train the notebook's Siamese change model (its dataset,
augmentations, weak label and focal loss) on the competition's data."""
