"""A run: the recipe, preparing the model and data, the loop (reference, then per stage: cached? ->
run -> measure -> gate -> record), the stage cache and the checked ONNX export."""
