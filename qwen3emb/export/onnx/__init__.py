"""The fp32 ONNX graph: trace on the meta device, replicate uniform layers, stream weights in,
rewrite into onnxruntime's fused kernels, and check the graph contract."""
