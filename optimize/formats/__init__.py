"""A model as output for another engine: the ONNX graph and the modules it is traced through, and
the decoder formats (compressed-tensors, GGUF, OpenVINO GenAI, onnxruntime-genai's pre-quantized
checkpoint), each with the loader that gates it through its engine."""
