"""Deployment targets of a trained EVF-SAM: ONNX graphs with an onnxruntime predictor (`onnx`) and
the Gradio demo (`demo`)."""
