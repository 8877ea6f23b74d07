"""ONNX and TensorRT export of the temporal UNet, decoder and text encoder."""
