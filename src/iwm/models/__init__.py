"""iwm.models: ViT encoder, predictor, the IWM training model."""
