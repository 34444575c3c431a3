"""The pipeline's stages, numpy in and numpy out: decoding images (`images`), model inputs
(`preprocess`), decoding detections (`detect`), Weighted Boxes Fusion (`fusion`), the
change heatmap (`heatmap`), matching objects between images (`matching`), pixel
rounding shared by them (`pixels`). Nothing here knows bundles, sessions or files."""
