"""Pre-processing from image file to model input: the letterbox (and its exact inverse), the
decoded-input cache, and box-aware training augmentation."""
